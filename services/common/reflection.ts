/**
 * Server reflection fed from the raw `buf build` FileDescriptorSet (proto/cowherd.binpb), so grpcurl and
 * clients in other languages see complete descriptors with their dependency lists and comments.
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { ReflectionService } from '@grpc/reflection';
import type { Server } from '@grpc/grpc-js';

/** Where `npm run generate` writes the descriptor set. */
export const DEFAULT_DESCRIPTOR_SET_PATH = fileURLToPath(new URL('../../proto/cowherd.binpb', import.meta.url));

/** Reads a FileDescriptorSet file. */
export function readDescriptorSet(path = DEFAULT_DESCRIPTOR_SET_PATH): Buffer {
  return readFileSync(path);
}

/**
 * Splits a serialized FileDescriptorSet into the serialized FileDescriptorProtos it holds, without
 * decoding them (field 1, length-delimited, repeated): what the reflection service re-serves.
 */
export function splitDescriptorSet(set: Buffer): Buffer[] {
  const files: Buffer[] = [];
  let offset = 0;
  const readVarint = (): number => {
    let result = 0;
    let shift = 0;
    for (;;) {
      if (offset >= set.length) throw new Error('truncated FileDescriptorSet');
      const byte = set[offset++]!;
      result += (byte & 0x7f) * 2 ** shift;
      if ((byte & 0x80) === 0) return result;
      shift += 7;
    }
  };
  while (offset < set.length) {
    const tag = readVarint();
    if (tag !== ((1 << 3) | 2)) throw new Error(`unexpected tag ${tag} in FileDescriptorSet`);
    const length = readVarint();
    files.push(set.subarray(offset, offset + length));
    offset += length;
  }
  return files;
}

/** Adds reflection (v1 and v1alpha) to a server, listing only `serviceNames` (what the server really serves). */
export function addReflection(server: Pick<Server, 'addService'>, descriptorSet: Buffer, serviceNames: readonly string[]): void {
  const packageDefinition = { cowherd: { fileDescriptorProtos: splitDescriptorSet(descriptorSet) } };
  const reflection = new ReflectionService(packageDefinition as unknown as ConstructorParameters<typeof ReflectionService>[0], {
    services: [...serviceNames, 'grpc.reflection.v1.ServerReflection', 'grpc.reflection.v1alpha.ServerReflection'],
  });
  reflection.addToServer(server);
}
