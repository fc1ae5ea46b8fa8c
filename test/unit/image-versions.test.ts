/**
 * Image versions as the catalog answers them: a caller's name resolved to one version with the image's head,
 * the image view (latest record, aliases, versions, keep_versions), version records named by number, and the
 * filter fields that select by version (a version 1 recorded without its number still matches).
 */
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Image, ImageHead, Image_State, ImageReplica, VirtualMachine } from '../../services/gen/cowherd/inventory/v1/resources.js';
import { CowherdError } from '../../services/common/platform/errors.js';
import { imageNameField, imageVersionNameField, parseFilter } from '../../services/common/domain/filter.js';
import {
  aliasesOf,
  findImageVersion,
  imageVersionRecord,
  imageViewOf,
  numberedRecords,
  recordVersionOf,
  resolveVersionNumber,
} from '../../services/common/domain/image-versions.js';
import { IMAGE_NAME, imageKey, parseImageReference, type ImageReference } from '../../services/common/domain/resource-names.js';

/** A catalog record of version `version` of `id`, as stored (named by its storage key). */
function record(id: string, version: number, state = Image_State.STATE_AVAILABLE, storedVersion = version): Image {
  return Image.fromPartial({
    name: IMAGE_NAME.format({ image: imageKey(id, version) }),
    description: `${id} v${version}`,
    state,
    version: String(storedVersion),
    domainTemplate: `<domain>v${version}</domain>`,
  });
}

function head(latest: number, last: number, aliases: Record<string, number> = {}, keepVersions = 0): ImageHead {
  return ImageHead.fromPartial({
    image: 'images/debian-12',
    latestVersion: String(latest),
    lastVersion: String(last),
    aliases: Object.fromEntries(Object.entries(aliases).map(([alias, version]) => [alias, String(version)])),
    keepVersions,
  });
}

function reference(name: string): ImageReference {
  const parsed = parseImageReference(name);
  assert.ok(parsed, name);
  return parsed;
}

describe('image versions', () => {
  describe('resolveVersionNumber', () => {
    it('an image without a head has the single version 1', () => {
      assert.equal(resolveVersionNumber(reference('images/debian-12'), undefined), 1);
      assert.equal(resolveVersionNumber(reference('images/debian-12/versions/latest'), undefined), 1);
      assert.equal(resolveVersionNumber(reference('images/debian-12/versions/1'), undefined), 1);
      assert.equal(resolveVersionNumber(reference('images/debian-12/versions/stable'), undefined), undefined);
    });

    it('latest is the head latest, aliases are the head aliases, numbers stand for themselves', () => {
      const current = head(3, 4, { stable: 2 });
      assert.equal(resolveVersionNumber(reference('images/debian-12'), current), 3);
      assert.equal(resolveVersionNumber(reference('images/debian-12/versions/latest'), current), 3);
      assert.equal(resolveVersionNumber(reference('images/debian-12/versions/stable'), current), 2);
      assert.equal(resolveVersionNumber(reference('images/debian-12/versions/4'), current), 4);
      assert.equal(resolveVersionNumber(reference('images/debian-12/versions/testing'), current), undefined);
    });

    it('latest is unknown while no version is AVAILABLE', () => {
      assert.equal(resolveVersionNumber(reference('images/debian-12'), head(0, 1)), undefined);
    });

    it('aliasesOf lists latest with the others, and no latest before one is AVAILABLE', () => {
      assert.deepEqual(aliasesOf(undefined), { latest: '1' });
      assert.deepEqual(aliasesOf(head(3, 4, { stable: 2 })), { stable: '2', latest: '3' });
      assert.deepEqual(aliasesOf(head(0, 1)), {});
    });
  });

  describe('records', () => {
    it('recordVersionOf reads the id from the name and the number from version, else from the key', () => {
      assert.deepEqual(recordVersionOf(record('debian-12', 3)), { id: 'debian-12', version: 3 });
      assert.deepEqual(recordVersionOf(record('debian-12', 1, Image_State.STATE_AVAILABLE, 0)), { id: 'debian-12', version: 1 });
      assert.deepEqual(recordVersionOf(record('debian-12', 3, Image_State.STATE_AVAILABLE, 0)), { id: 'debian-12', version: 3 });
      assert.equal(recordVersionOf(Image.fromPartial({ name: 'hosts/x' })), undefined);
    });

    it('numberedRecords orders by number, not by name (9 before 10)', () => {
      const records = [record('x', 10), record('x', 1), record('x', 9), record('x', 2)];
      assert.deepEqual(
        numberedRecords(records).map((entry) => entry.version),
        [1, 2, 9, 10],
      );
    });

    it('a version record is named by number, also version 1, and carries no view fields', () => {
      const one = imageVersionRecord({ ...record('debian-12', 1, Image_State.STATE_AVAILABLE, 0), aliases: { latest: '1' }, versions: ['1'] });
      assert.equal(one.name, 'images/debian-12/versions/1');
      assert.equal(one.version, '1');
      assert.deepEqual(one.aliases, {});
      assert.deepEqual(one.versions, []);
      assert.equal(imageVersionRecord(record('debian-12', 3)).name, 'images/debian-12/versions/3');
    });
  });

  describe('imageViewOf', () => {
    it('an image published before versions existed is its version 1', () => {
      const view = imageViewOf([record('debian-12', 1, Image_State.STATE_AVAILABLE, 0)], undefined)!;
      assert.equal(view.name, 'images/debian-12');
      assert.equal(view.version, '1');
      assert.deepEqual(view.aliases, { latest: '1' });
      assert.deepEqual(view.versions, ['1']);
      assert.equal(view.keepVersions, 0);
      assert.equal(view.description, 'debian-12 v1');
    });

    it('is the latest version record, with every alias, every existing version and keep_versions', () => {
      const records = [record('debian-12', 4, Image_State.STATE_PUBLISHING), record('debian-12', 1), record('debian-12', 3), record('debian-12', 2)];
      const view = imageViewOf(records, head(3, 4, { stable: 2 }, 5))!;
      assert.equal(view.name, 'images/debian-12');
      assert.equal(view.version, '3');
      assert.equal(view.description, 'debian-12 v3');
      assert.equal(view.domainTemplate, '<domain>v3</domain>');
      assert.equal(view.state, Image_State.STATE_AVAILABLE);
      assert.deepEqual(view.aliases, { stable: '2', latest: '3' });
      assert.deepEqual(view.versions, ['1', '2', '3', '4']);
      assert.equal(view.keepVersions, 5);
    });

    it('a deleted version is not listed; numbers are not renumbered', () => {
      const view = imageViewOf([record('x', 1), record('x', 3)], head(3, 3))!;
      assert.deepEqual(view.versions, ['1', '3']);
    });

    it('while no version is AVAILABLE the newest record stands in (an image being published reads as before)', () => {
      const publishing = [record('x', 1, Image_State.STATE_PUBLISHING)];
      assert.equal(imageViewOf(publishing, undefined)!.state, Image_State.STATE_PUBLISHING);
      const view = imageViewOf(publishing, head(0, 1))!;
      assert.equal(view.name, 'images/x');
      assert.equal(view.version, '1');
      assert.equal(view.state, Image_State.STATE_PUBLISHING);
      assert.deepEqual(view.aliases, {});
    });

    it('no records, no view', () => {
      assert.equal(imageViewOf([], undefined), undefined);
      assert.equal(imageViewOf([], head(2, 2)), undefined);
    });
  });

  describe('findImageVersion', () => {
    const records = [record('debian-12', 1), record('debian-12', 2), record('debian-12', 3)];
    const current = head(3, 3, { stable: 2 });

    it('finds a version by number, alias or latest, named by number', () => {
      assert.equal(findImageVersion(records, current, reference('images/debian-12/versions/1'))!.name, 'images/debian-12/versions/1');
      assert.equal(findImageVersion(records, current, reference('images/debian-12/versions/stable'))!.name, 'images/debian-12/versions/2');
      assert.equal(findImageVersion(records, current, reference('images/debian-12/versions/latest'))!.name, 'images/debian-12/versions/3');
      assert.equal(findImageVersion(records, current, reference('images/debian-12'))!.version, '3');
    });

    it('nothing for an unknown alias or a number without a record', () => {
      assert.equal(findImageVersion(records, current, reference('images/debian-12/versions/testing')), undefined);
      assert.equal(findImageVersion(records, current, reference('images/debian-12/versions/4')), undefined);
      assert.equal(findImageVersion(records, current, reference('images/other/versions/1')), undefined);
    });
  });

  describe('filter fields', () => {
    const vm = (name: string, fields: Parameters<typeof VirtualMachine.fromPartial>[0]): VirtualMachine =>
      VirtualMachine.fromPartial({ name: `hosts/h/virtualMachines/${name}`, ...fields });
    const vms = [
      vm('new-v2', { sourceImage: 'images/x', sourceImageVersion: 'images/x/versions/2' }),
      vm('new-v1', { sourceImage: 'images/x', sourceImageVersion: 'images/x/versions/1' }),
      vm('lineage-v1', {
        sourceImage: 'images/x',
        lineage: { image: 'images/x', imageVersion: 'images/x' },
      }),
      vm('before-versions', { sourceImage: 'images/x' }),
      vm('other', { sourceImage: 'images/y', sourceImageVersion: 'images/y/versions/1' }),
      vm('hand-made', {}),
    ];
    const fields = {
      source_image: imageNameField<VirtualMachine>((item) => item.sourceImage, { allowEmpty: true }),
      source_image_version: imageVersionNameField<VirtualMachine>((item) => item.sourceImageVersion || item.lineage?.imageVersion || item.sourceImage, {
        allowEmpty: true,
      }),
    };
    const select = (filter: string): string[] => vms.filter(parseFilter(filter, fields)).map((item) => item.name.split('/').at(-1)!);

    it('a numbered version matches exactly; version 1 also where it was recorded without its number', () => {
      assert.deepEqual(select('source_image_version = "images/x/versions/2"'), ['new-v2']);
      assert.deepEqual(select('source_image_version = "images/x/versions/1"'), ['new-v1', 'lineage-v1', 'before-versions']);
      assert.deepEqual(select('source_image_version = ""'), ['hand-made']);
      assert.deepEqual(select('source_image_version != "images/x/versions/1" AND source_image = "images/x"'), ['new-v2']);
    });

    it('source_image keeps meaning every version of the image', () => {
      assert.deepEqual(select('source_image = "images/x"'), ['new-v2', 'new-v1', 'lineage-v1', 'before-versions']);
    });

    it('refuses values no item could hold: an alias, an unnumbered name for a version, a version for an image', () => {
      for (const filter of [
        'source_image_version = "images/x/versions/latest"',
        'source_image_version = "images/x"',
        'source_image_version = "images/x/versions/0"',
        'source_image = "images/x/versions/2"',
        'source_image = "images/x_v2"',
      ]) {
        assert.throws(
          () => parseFilter(filter, fields),
          (error: unknown) => error instanceof CowherdError && error.field === 'filter',
          filter,
        );
      }
    });

    it('a replica field reads the version from the replica name when the record has none', () => {
      const replicaFields = {
        image: imageNameField<ImageReplica>((replica) => replica.image),
        image_version: imageVersionNameField<ImageReplica>((replica) => replica.imageVersion || replica.image),
      };
      const replicas = [
        ImageReplica.fromPartial({ name: 'hosts/h/images/x', image: 'images/x' }),
        ImageReplica.fromPartial({ name: 'hosts/h/images/x/versions/2', image: 'images/x', imageVersion: 'images/x/versions/2' }),
      ];
      assert.deepEqual(
        replicas.filter(parseFilter('image_version = "images/x/versions/1"', replicaFields)).map((replica) => replica.name),
        ['hosts/h/images/x'],
      );
      assert.equal(replicas.filter(parseFilter('image = "images/x"', replicaFields)).length, 2);
    });
  });
});
