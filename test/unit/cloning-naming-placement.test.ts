// Clone names and placement as pure functions: template syntax, rendering, uniqueness against the fleet and
// within the request, round robin with a per-host limit, and spreading where the image is.
//
//   node --import tsx --test test/unit/cloning-naming-placement.test.ts
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { ErrorReason } from '../../services/gen/cowherd/common/v1/error_reason.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { DEFAULT_NAME_TEMPLATE, parseNameTemplate, randomSuffix, renderName, renderNames } from '../../services/cloning/name-template.js';
import { placeRoundRobin, placeSpread } from '../../services/cloning/placement.js';

function invalid(field: string): (error: unknown) => boolean {
  return (error) => {
    assert.ok(error instanceof CowherdError, String(error));
    assert.equal(error.code, GrpcStatus.INVALID_ARGUMENT, error.message);
    assert.equal(error.field, field, error.message);
    return true;
  };
}

/** Draws from a fixed list, then "zzzzz0", "zzzzz1", ... */
function draws(...values: string[]): () => string {
  let extra = 0;
  return () => values.shift() ?? `zzzzz${extra++}`;
}

describe('name templates', () => {
  it('defaults to {source}-{random} and renders every placeholder', () => {
    const template = parseNameTemplate('', 3);
    assert.equal(template.text, DEFAULT_NAME_TEMPLATE);
    assert.equal(renderName(template, { source: 'debian-12', index: 2, host: 'kvm-01' }, 'ab12cd'), 'debian-12-ab12cd');
    const full = parseNameTemplate('{source}.{host}_{index}-{random}', 1);
    assert.equal(renderName(full, { source: 'web', index: 12, host: 'kvm-01' }, 'x0x0x0'), 'web.kvm-01_12-x0x0x0');
  });

  it('draws six characters of [a-z0-9] for {random}', () => {
    for (let i = 0; i < 200; i++) assert.match(randomSuffix(), /^[a-z0-9]{6}$/);
  });

  it('refuses unknown placeholders, stray braces and characters no domain name holds', () => {
    for (const bad of ['{nope}', '{source', 'web-}', 'web {index}', 'web/{index}', '{Source}-{index}', `${'x'.repeat(257)}`]) {
      assert.throws(() => parseNameTemplate(bad, 1), invalid('name_template'), bad);
    }
  });

  it('needs {index} or {random} when count is above 1', () => {
    assert.throws(() => parseNameTemplate('{source}-{host}', 2), invalid('name_template'));
    assert.doesNotThrow(() => parseNameTemplate('{source}-{host}', 1));
    assert.doesNotThrow(() => parseNameTemplate('{source}-{index}', 2));
    assert.doesNotThrow(() => parseNameTemplate('{source}-{random}', 2));
  });

  it('refuses a rendered name that is no valid domain name', () => {
    const clones = [{ source: 'a'.repeat(60), index: 1, host: 'kvm-01' }];
    assert.throws(
      () => renderNames(parseNameTemplate('{source}-{random}', 1), clones, { namesInUse: new Map(), random: draws('abcdef') }),
      invalid('name_template'),
    );
    assert.throws(
      () => renderNames(parseNameTemplate('-{index}', 1), [{ source: 's', index: 1, host: 'h' }], { namesInUse: new Map() }),
      invalid('name_template'),
    );
  });

  it('draws {random} again when the name is taken in the fleet or in this request', () => {
    const template = parseNameTemplate('', 3);
    const clones = [1, 2, 3].map((index) => ({ source: 'img', index, host: 'kvm-01' }));
    const names = renderNames(template, clones, {
      namesInUse: new Map([['img-aaaaaa', 'hosts/kvm-02/virtualMachines/img-aaaaaa']]),
      random: draws('aaaaaa', 'bbbbbb', 'bbbbbb', 'cccccc', 'dddddd'),
    });
    assert.deepEqual(names, ['img-bbbbbb', 'img-cccccc', 'img-dddddd']);
  });

  it('refuses an explicit name the fleet already uses with ALREADY_EXISTS (VIRTUAL_MACHINE_NAME_TAKEN)', () => {
    const template = parseNameTemplate('web-{index}', 2);
    const clones = [1, 2].map((index) => ({ source: 'img', index, host: 'kvm-01' }));
    assert.throws(
      () => renderNames(template, clones, { namesInUse: new Map([['web-2', 'hosts/kvm-09/virtualMachines/web-2']]) }),
      (error: unknown) => {
        assert.ok(error instanceof CowherdError);
        assert.equal(error.code, GrpcStatus.ALREADY_EXISTS);
        assert.equal(error.reason, ErrorReason.ERROR_REASON_VIRTUAL_MACHINE_NAME_TAKEN);
        assert.deepEqual(error.metadata, { domain_name: 'web-2', virtual_machine: 'hosts/kvm-09/virtualMachines/web-2' });
        return true;
      },
    );
  });

  it('refuses a template whose names collide within the request even with {index}', () => {
    // host "a" with index 11 and host "a1" with index 1 both give "a11".
    const template = parseNameTemplate('{host}{index}', 11);
    const clones = Array.from({ length: 11 }, (_, offset) => ({ source: 's', index: offset + 1, host: offset === 0 ? 'a1' : 'a' }));
    assert.throws(() => renderNames(template, clones, { namesInUse: new Map() }), invalid('name_template'));
  });
});

describe('placement', () => {
  it('round robin goes over the listed hosts in order', () => {
    assert.deepEqual(placeRoundRobin(['hosts/b', 'hosts/a'], 5, 0), ['hosts/b', 'hosts/a', 'hosts/b', 'hosts/a', 'hosts/b']);
  });

  it('round robin skips full hosts and refuses a limit that leaves no room', () => {
    assert.deepEqual(placeRoundRobin(['hosts/a', 'hosts/b', 'hosts/c'], 5, 2), ['hosts/a', 'hosts/b', 'hosts/c', 'hosts/a', 'hosts/b']);
    assert.deepEqual(placeRoundRobin(['hosts/a'], 2, 2), ['hosts/a', 'hosts/a']);
    assert.throws(() => placeRoundRobin(['hosts/a', 'hosts/b'], 5, 2), invalid('placement.max_clones_per_host'));
  });

  it('spreads over hosts holding the image, fewest clones first, ties by name', () => {
    assert.deepEqual(placeSpread(['hosts/c', 'hosts/b'], ['hosts/a', 'hosts/b', 'hosts/c'], 5, 0), ['hosts/b', 'hosts/c', 'hosts/b', 'hosts/c', 'hosts/b']);
  });

  it('sends what the per-host limit leaves over to the other hosts', () => {
    assert.deepEqual(placeSpread(['hosts/c', 'hosts/b'], ['hosts/a', 'hosts/b', 'hosts/c', 'hosts/d'], 7, 2), [
      'hosts/b',
      'hosts/c',
      'hosts/b',
      'hosts/c',
      'hosts/a',
      'hosts/d',
      'hosts/a',
    ]);
    assert.throws(() => placeSpread(['hosts/b'], ['hosts/a', 'hosts/b'], 5, 2), invalid('placement.max_clones_per_host'));
  });

  it('uses the other hosts when no host holds the image', () => {
    assert.deepEqual(placeSpread([], ['hosts/b', 'hosts/a'], 3, 0), ['hosts/a', 'hosts/b', 'hosts/a']);
  });
});
