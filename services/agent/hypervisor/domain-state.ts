/** libvirt's domains in the inventory's words: their state and their `{virtualMachine}` id. */
import { VirtualMachine_State } from '../../gen/cowherd/inventory/v1/resources.js';
import { VIRTUAL_MACHINE_ID } from '../../common/domain/resource-names.js';
import type { DomainInfo, DomainState } from './libvirt.js';

/** libvirt's state as the inventory's VirtualMachine.State. */
export function virtualMachineState(state: DomainState): VirtualMachine_State {
  switch (state) {
    case 'running':
      return VirtualMachine_State.STATE_RUNNING;
    case 'paused':
      return VirtualMachine_State.STATE_PAUSED;
    case 'shut off':
      return VirtualMachine_State.STATE_SHUT_OFF;
    case 'crashed':
      return VirtualMachine_State.STATE_CRASHED;
    case 'pmsuspended':
      return VirtualMachine_State.STATE_SUSPENDED;
    case 'idle':
    case 'in shutdown':
    case 'no state':
      return VirtualMachine_State.STATE_OTHER;
  }
}

/** `{virtual_machine}` of a domain: its name when that is a safe id, else its UUID. */
export function virtualMachineId(domain: Pick<DomainInfo, 'name' | 'uuid'>): string {
  return VIRTUAL_MACHINE_ID.test(domain.name) ? domain.name : domain.uuid.toLowerCase();
}
