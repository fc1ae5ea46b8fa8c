/**
 * The version bookkeeping of distribution (image-heads.ts) on an in-memory KV with real compare-and-set: which
 * version a publish claims, that concurrent claims of one image yield one winner, `latest` moving, a deleted
 * version leaving the head, resolution of callers' names and UpdateImage's checks.
 */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { status as GrpcStatus } from '@grpc/grpc-js';
import { Image, Image_State, ImageHead } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { KvConflictError, type KvStore } from '../../services/common/platform/kv.js';
import type { CowherdError } from '../../services/common/platform/errors.js';
import { claimVersion, forgetVersion, resolveImage, setLatest, updateImage } from '../../services/distribution/image-heads.js';

/** A KV bucket in memory with revisions, create-if-absent and update-if-unchanged; every call yields once. */
function memoryKv<T>(): KvStore<T> & { values: Map<string, { value: T; revision: number }> } {
  const values = new Map<string, { value: T; revision: number }>();
  let sequence = 0;
  const tick = () => new Promise((resolve) => setImmediate(resolve));
  const store = {
    values,
    get: async (key: string) => {
      await tick();
      const entry = values.get(key);
      return entry ? { key, value: entry.value, revision: entry.revision } : undefined;
    },
    create: async (key: string, value: T) => {
      await tick();
      if (values.has(key)) throw new KvConflictError(key, new Error('key exists'));
      values.set(key, { value, revision: ++sequence });
      return sequence;
    },
    update: async (key: string, value: T, revision: number) => {
      await tick();
      if (values.get(key)?.revision !== revision) throw new KvConflictError(key, new Error('wrong last sequence'));
      values.set(key, { value, revision: ++sequence });
      return sequence;
    },
    put: async (key: string, value: T) => {
      values.set(key, { value, revision: ++sequence });
      return sequence;
    },
    delete: async (key: string, revision?: number) => {
      await tick();
      if (revision !== undefined && values.get(key)?.revision !== revision) throw new KvConflictError(key, new Error('wrong last sequence'));
      values.delete(key);
    },
    list: async () => {
      await tick();
      return [...values.entries()].map(([key, entry]) => ({ key, value: entry.value, revision: entry.revision }));
    },
    mutate: async (key: string, change: (current: T | undefined) => T | undefined) => {
      for (;;) {
        const current = await store.get(key);
        const next = change(current?.value);
        if (next === undefined) return current;
        try {
          const revision = current ? await store.update(key, next, current.revision) : await store.create(key, next);
          return { key, value: next, revision };
        } catch (error) {
          if (!(error instanceof KvConflictError)) throw error;
        }
      }
    },
  };
  return store as unknown as KvStore<T> & { values: Map<string, { value: T; revision: number }> };
}

function setup() {
  const images = memoryKv<Image>();
  const heads = memoryKv<ImageHead>();
  return { images, heads, deps: { images, heads } };
}

const publishing = (name: string, version: number) => Image.fromPartial({ name, version: String(version), state: Image_State.STATE_PUBLISHING });

async function makeAvailable(deps: ReturnType<typeof setup>['deps'], key: string, id: string, version: number): Promise<void> {
  await deps.images.mutate(key, (current) => ({ ...current!, state: Image_State.STATE_AVAILABLE }));
  await setLatest(deps, id, version);
}

describe('image heads', () => {
  test('version 1 on a new id, the next number on an AVAILABLE one, a FAILED version 1 replaced', async () => {
    const { deps, heads, images } = setup();
    const first = await claimVersion(deps, 'deb', publishing);
    assert.deepEqual([first.key, first.version, first.name], ['deb', 1, 'images/deb']);
    await deps.images.mutate('deb', (current) => ({ ...current!, state: Image_State.STATE_FAILED }));
    const again = await claimVersion(deps, 'deb', publishing);
    assert.equal(again.key, 'deb', 'a FAILED version 1 alone is replaced');
    await makeAvailable(deps, 'deb', 'deb', 1);
    assert.deepEqual([heads.values.get('deb')!.value.latestVersion, heads.values.get('deb')!.value.lastVersion], ['1', '1']);
    const second = await claimVersion(deps, 'deb', publishing);
    assert.deepEqual([second.key, second.version, second.name], ['deb_v2', 2, 'images/deb/versions/2']);
    assert.equal(images.values.get('deb_v2')!.value.state, Image_State.STATE_PUBLISHING);
    assert.equal(heads.values.get('deb')!.value.lastVersion, '2');
    assert.equal(heads.values.get('deb')!.value.latestVersion, '1', 'latest moves only when the version is AVAILABLE');
    await assert.rejects(claimVersion(deps, 'deb', publishing), (error: CowherdError) => error.code === GrpcStatus.FAILED_PRECONDITION);
    await makeAvailable(deps, 'deb', 'deb', 2);
    assert.equal(heads.values.get('deb')!.value.latestVersion, '2');
    await setLatest(deps, 'deb', 1);
    assert.equal(heads.values.get('deb')!.value.latestVersion, '2', 'an older version never becomes latest again by becoming AVAILABLE');
  });

  test('concurrent claims of one image: exactly one wins, the others are FAILED_PRECONDITION', async () => {
    const { deps, images } = setup();
    await claimVersion(deps, 'x', publishing);
    await makeAvailable(deps, 'x', 'x', 1);
    const results = await Promise.allSettled(Array.from({ length: 6 }, () => claimVersion(deps, 'x', publishing)));
    const won = results.filter((result) => result.status === 'fulfilled');
    assert.equal(won.length, 1, JSON.stringify(results.map((result) => result.status)));
    for (const result of results) if (result.status === 'rejected') assert.equal((result.reason as CowherdError).code, GrpcStatus.FAILED_PRECONDITION);
    assert.deepEqual([...images.values.keys()].sort(), ['x', 'x_v2']);
  });

  test('a deleted version leaves the head: aliases on it go, latest moves back, numbers are not reused', async () => {
    const { deps, heads, images } = setup();
    for (const version of [1, 2, 3]) {
      const claimed = await claimVersion(deps, 'x', publishing);
      assert.equal(claimed.version, version);
      await makeAvailable(deps, claimed.key, 'x', version);
    }
    await updateImage(deps, { image: Image.fromPartial({ name: 'images/x', aliases: { stable: '2', old: '1' } }), updateMask: ['aliases'] });
    images.values.delete('x_v2');
    await forgetVersion(deps, 'x', 2);
    assert.deepEqual(heads.values.get('x')!.value.aliases, { old: '1' });
    images.values.delete('x_v3');
    await forgetVersion(deps, 'x', 3);
    assert.equal(heads.values.get('x')!.value.latestVersion, '1');
    assert.equal((await claimVersion(deps, 'x', publishing)).version, 4);
  });

  test('resolves names by latest, number and alias; UpdateImage names the bad field', async () => {
    const { deps } = setup();
    for (const version of [1, 2]) {
      const claimed = await claimVersion(deps, 'x', publishing);
      await makeAvailable(deps, claimed.key, 'x', version);
    }
    const view = await updateImage(deps, {
      image: Image.fromPartial({ name: 'images/x', aliases: { stable: '1' }, keepVersions: 4 }),
      updateMask: ['aliases', 'keep_versions'],
    });
    assert.deepEqual([view.name, view.version, view.versions, view.aliases, view.keepVersions], ['images/x', '2', ['1', '2'], { stable: '1', latest: '2' }, 4]);
    assert.equal((await resolveImage(deps, 'images/x', 'image')).key, 'x_v2');
    assert.equal((await resolveImage(deps, 'images/x/versions/1', 'image')).key, 'x');
    assert.equal((await resolveImage(deps, 'images/x/versions/stable', 'image')).key, 'x');
    assert.equal((await resolveImage(deps, 'images/x/versions/latest', 'image')).key, 'x_v2');
    await assert.rejects(resolveImage(deps, 'images/x/versions/nope', 'image'), (error: CowherdError) => error.code === GrpcStatus.NOT_FOUND);
    await assert.rejects(resolveImage(deps, 'images/x/versions/9', 'image'), (error: CowherdError) => error.code === GrpcStatus.NOT_FOUND);
    await assert.rejects(resolveImage(deps, 'images/X', 'image'), (error: CowherdError) => error.field === 'image');
    const cases: Array<[Partial<Image>, string[], string]> = [
      [{ aliases: { latest: '1' } }, ['aliases'], 'image.aliases'],
      [{ aliases: { '1st': '1' } }, ['aliases'], 'image.aliases'],
      [{ aliases: { stable: '3' } }, ['aliases'], 'image.aliases'],
      [{ keepVersions: -1 }, ['keep_versions'], 'image.keep_versions'],
      [{}, ['description'], 'update_mask'],
      [{}, [], 'update_mask'],
      [{}, ['*'], 'update_mask'],
      [{ name: 'images/x/versions/1' }, ['aliases'], 'image.name'],
    ];
    for (const [image, mask, field] of cases) {
      await assert.rejects(
        updateImage(deps, { image: Image.fromPartial({ name: 'images/x', ...image }), updateMask: mask }),
        (error: CowherdError) => error.code === GrpcStatus.INVALID_ARGUMENT && error.field === field,
        `${JSON.stringify(image)} ${mask.join(',')}`,
      );
    }
  });
});
