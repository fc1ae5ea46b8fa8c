/**
 * Path checks of the domain XML layers: host paths in caller XML and options are absolute, plain (no `.`,
 * `..` or control characters) and stay inside their directory, lexically and after resolving symlinks.
 */
import { lstat, readlink, realpath } from 'node:fs/promises';
import path from 'node:path';
import { DomainXmlError } from './errors.js';

/** File names inside an image or clone directory: one path segment, nothing hidden. */
export const FILE_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

function hasControlCharacters(value: string): boolean {
  return /[\u0000-\u001f\u007f]/.test(value);
}

/** Absolute, no `.`/`..` segments, no control characters. */
export function isPlainAbsolute(value: string): boolean {
  return path.posix.isAbsolute(value) && !hasControlCharacters(value) && !value.split('/').some((segment) => segment === '..' || segment === '.');
}

export function isInsideLexically(directory: string, candidate: string): boolean {
  const relative = path.posix.relative(path.posix.resolve(directory), path.posix.resolve(candidate));
  return relative !== '' && !relative.startsWith('..') && !path.posix.isAbsolute(relative);
}

/**
 * The real path of `candidate`, resolving symlinks in the part that exists and appending the rest. A dangling
 * symlink is followed by hand (realpath fails on it), since whoever opens the path would create its target.
 */
async function realPathOfExistingPart(candidate: string, depth = 0): Promise<string> {
  if (depth > 40) throw DomainXmlError.pathOutside('path', candidate, 'has too many levels of symbolic links');
  const missing: string[] = [];
  let current = path.posix.resolve(candidate);
  for (;;) {
    try {
      return path.posix.join(await realpath(current), ...missing.reverse());
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if ((code !== 'ENOENT' && code !== 'ENOTDIR') || current === '/') throw error;
      const entry = await lstat(current).catch(() => undefined);
      if (entry?.isSymbolicLink()) {
        const target = path.posix.resolve(path.posix.dirname(current), await readlink(current));
        return realPathOfExistingPart(path.posix.join(target, ...missing.reverse()), depth + 1);
      }
      missing.push(path.posix.basename(current));
      current = path.posix.dirname(current);
    }
  }
}

/**
 * Checks that `candidate` stays inside `directory`: absolute, no `..`, lexically inside, and inside after
 * resolving the symlinks of whatever part of it exists. Returns the normalized path.
 */
export async function assertInsideDirectory(directory: string, candidate: string, field: string): Promise<string> {
  if (typeof candidate !== 'string' || candidate === '') throw DomainXmlError.invalidField(field, 'is empty');
  if (!isPlainAbsolute(candidate))
    throw DomainXmlError.pathOutside(field, candidate, 'must be an absolute path without "." or ".." segments or control characters');
  if (!isInsideLexically(directory, candidate)) throw DomainXmlError.pathOutside(field, candidate, `is not inside ${directory}`);
  const [realDirectory, realCandidate] = await Promise.all([realPathOfExistingPart(directory), realPathOfExistingPart(candidate)]);
  if (!isInsideLexically(realDirectory, realCandidate))
    throw DomainXmlError.pathOutside(field, candidate, `resolves through a symlink to ${realCandidate}, outside ${directory}`);
  return path.posix.normalize(candidate);
}

export function assertDirectoryOption(value: string | undefined, field: string): string {
  if (typeof value !== 'string' || !isPlainAbsolute(value)) throw DomainXmlError.invalidField(field, 'must be an absolute path without "." or ".." segments');
  return path.posix.normalize(value);
}

export function assertFileName(value: string, field: string): string {
  if (!FILE_NAME_PATTERN.test(value)) throw DomainXmlError.pathOutside(field, value, `must be a single file name matching ${FILE_NAME_PATTERN.source}`);
  return value;
}
