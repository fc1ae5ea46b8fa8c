/**
 * The image directory room: its layout (every path under COWHERD_IMAGE_DIR) and the file helpers the
 * agent's image modules share. Every other room may use it; it uses none.
 */
export {
  cloneDataDiskFile,
  cloneDefinitionFile,
  cloneDirectory,
  cloneDiskFile,
  cloneSeedFile,
  clonesDirectory,
  defineWorkDirectory,
  eventOutboxDirectory,
  exportLockKey,
  exportWorkDirectories,
  exportWorkDirectory,
  imagesDirectory,
  importDirectory,
  isInsideImageDirectory,
  overlayPrototypeFile,
  partialDirectoryOf,
  prepareImageDirectory,
  rebaseWorkFile,
  replicaDirectory,
  replicaFile,
  replicaGenerationDirectories,
  replicaGenerationOf,
  replicaPartialDirectory,
  replicaStateFile,
  replicaStateFileId,
  TEMPLATE_FILE,
  templateFile,
} from './layout.js';
export { fsyncDirectory, hashAndSync, pathExists, removeTree } from './file-tree.js';
