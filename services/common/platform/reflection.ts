/**
 * gRPC server reflection (v1, and v1alpha for older clients: the messages are identical on the wire),
 * served straight from the raw `buf build` FileDescriptorSet (proto/cowherd.binpb). Files are sent as
 * the exact bytes buf wrote, comments and options included, and always with every file they import,
 * transitively: grpcurl (Go protodesc) and Python's descriptor pool refuse a file whose imports are
 * missing, which is what descriptors rebuilt by proto-loader or @grpc/reflection produce for imports
 * used only for options (google/api/field_behavior.proto).
 */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { status as GrpcStatus, type Server, type ServerDuplexStream, type ServiceDefinition } from '@grpc/grpc-js';
import { FileDescriptorProto, type DescriptorProto } from '../../gen/google/protobuf/descriptor.js';
import { ServerReflectionService, type ServerReflectionRequest, type ServerReflectionResponse } from '../../gen/grpc/reflection/v1/reflection.js';
import { adaptBidiStreamHandler, REFLECTION_RULE, type BoundaryOptions } from './rpc.js';

/** Where `npm run generate` writes the descriptor set. */
export const DEFAULT_DESCRIPTOR_SET_PATH = fileURLToPath(new URL('../../../proto/cowherd.binpb', import.meta.url));

/** Reads a FileDescriptorSet file. */
export function readDescriptorSet(path = DEFAULT_DESCRIPTOR_SET_PATH): Buffer {
  return readFileSync(path);
}

/**
 * Splits a serialized FileDescriptorSet into the serialized FileDescriptorProtos it holds, without
 * decoding them (field 1, length-delimited, repeated).
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

/** The index that answers reflection requests. */
export class DescriptorIndex {
  private readonly raw = new Map<string, Buffer>();
  private readonly dependencies = new Map<string, readonly string[]>();
  private readonly symbols = new Map<string, string>();
  private readonly extensions = new Map<string, Map<number, string>>();
  private readonly services: readonly string[];

  /** Indexes `descriptorSet`; only `serviceNames` are listed (the services this server really serves). */
  constructor(descriptorSet: Buffer, serviceNames: readonly string[]) {
    for (const bytes of splitDescriptorSet(descriptorSet)) {
      const file = FileDescriptorProto.decode(bytes);
      const fileName = file.name ?? '';
      this.raw.set(fileName, bytes);
      this.dependencies.set(fileName, file.dependency);
      const prefix = file.package ? `${file.package}.` : '';
      const addMessages = (messages: readonly DescriptorProto[], scope: string): void => {
        for (const message of messages) {
          const name = `${scope}${message.name}`;
          this.symbols.set(name, fileName);
          for (const field of message.field) this.symbols.set(`${name}.${field.name}`, fileName);
          for (const nested of message.enumType) this.symbols.set(`${name}.${nested.name}`, fileName);
          for (const extension of message.extension) this.addExtension(extension.extendee ?? '', extension.number ?? 0, fileName, `${name}.${extension.name}`);
          addMessages(message.nestedType, `${name}.`);
        }
      };
      addMessages(file.messageType, prefix);
      for (const enumType of file.enumType) this.symbols.set(`${prefix}${enumType.name}`, fileName);
      for (const extension of file.extension) this.addExtension(extension.extendee ?? '', extension.number ?? 0, fileName, `${prefix}${extension.name}`);
      for (const service of file.service) {
        this.symbols.set(`${prefix}${service.name}`, fileName);
        for (const method of service.method) this.symbols.set(`${prefix}${service.name}.${method.name}`, fileName);
      }
    }
    const missing = serviceNames.filter((name) => !this.symbols.has(name));
    if (missing.length > 0) throw new Error(`descriptor set lacks served services: ${missing.join(', ')}`);
    this.services = [...serviceNames].sort();
  }

  /** Answers one reflection request. */
  answer(request: ServerReflectionRequest): ServerReflectionResponse {
    const base = { validHost: request.host, originalRequest: request.messageRequest === undefined ? undefined : request };
    const files = (name: string | undefined, what: string): ServerReflectionResponse =>
      name === undefined || !this.raw.has(name)
        ? {
            ...base,
            originalRequest: request,
            messageResponse: { $case: 'errorResponse', value: { errorCode: GrpcStatus.NOT_FOUND, errorMessage: `${what} not found` } },
          }
        : {
            ...base,
            originalRequest: request,
            messageResponse: { $case: 'fileDescriptorResponse', value: { fileDescriptorProto: this.withDependencies(name) } },
          };
    const message = request.messageRequest;
    switch (message?.$case) {
      case 'listServices':
        return {
          ...base,
          originalRequest: request,
          messageResponse: { $case: 'listServicesResponse', value: { service: this.services.map((name) => ({ name })) } },
        };
      case 'fileByFilename':
        return files(message.value, `file ${message.value}`);
      case 'fileContainingSymbol':
        return files(this.symbols.get(message.value.replace(/^\./, '')), `symbol ${message.value}`);
      case 'fileContainingExtension':
        return files(
          this.extensions.get(message.value.containingType.replace(/^\./, ''))?.get(message.value.extensionNumber),
          `extension ${message.value.extensionNumber} of ${message.value.containingType}`,
        );
      case 'allExtensionNumbersOfType': {
        const type = message.value.replace(/^\./, '');
        if (!this.symbols.has(type)) return files(undefined, `type ${type}`);
        return {
          ...base,
          originalRequest: request,
          messageResponse: {
            $case: 'allExtensionNumbersResponse',
            value: { baseTypeName: type, extensionNumber: [...(this.extensions.get(type)?.keys() ?? [])] },
          },
        };
      }
      default:
        return {
          ...base,
          originalRequest: request,
          messageResponse: { $case: 'errorResponse', value: { errorCode: GrpcStatus.INVALID_ARGUMENT, errorMessage: 'empty reflection request' } },
        };
    }
  }

  /** The file and every file it imports, transitively, dependencies first. */
  private withDependencies(name: string): Buffer[] {
    const ordered: Buffer[] = [];
    const seen = new Set<string>();
    const visit = (file: string): void => {
      if (seen.has(file)) return;
      seen.add(file);
      for (const dependency of this.dependencies.get(file) ?? []) visit(dependency);
      const bytes = this.raw.get(file);
      if (bytes) ordered.push(bytes);
    };
    visit(name);
    return ordered;
  }

  private addExtension(extendee: string, number: number, file: string, symbol: string): void {
    const type = extendee.replace(/^\./, '');
    if (!this.extensions.has(type)) this.extensions.set(type, new Map());
    this.extensions.get(type)!.set(number, file);
    this.symbols.set(symbol, file);
  }
}

/**
 * Adds reflection v1 and v1alpha to a server, listing `serviceNames` and the reflection service. Both go
 * through the RPC boundary (REFLECTION_RULE in rpc.ts): any cowherd identity whose certificate is not
 * revoked; refused callers get the same codes as on every other RPC, and every stream ends in an `rpc` line.
 */
export function addReflection(server: Pick<Server, 'addService'>, descriptorSet: Buffer, serviceNames: readonly string[], boundary: BoundaryOptions): void {
  const index = new DescriptorIndex(descriptorSet, [...serviceNames, 'grpc.reflection.v1.ServerReflection']);
  const serve = (call: ServerDuplexStream<unknown, unknown>): void => {
    call.on('data', (request: ServerReflectionRequest) => call.write(index.answer(request)));
    call.on('end', () => call.end());
    call.on('error', () => undefined);
  };
  const method = ServerReflectionService.serverReflectionInfo;
  const v1 = ServerReflectionService as unknown as ServiceDefinition;
  server.addService(v1, { serverReflectionInfo: adaptBidiStreamHandler(method.path, REFLECTION_RULE, boundary, serve) });
  const v1alphaPath = '/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo';
  const v1alpha = { serverReflectionInfo: { ...method, path: v1alphaPath } } as unknown as ServiceDefinition;
  server.addService(v1alpha, { serverReflectionInfo: adaptBidiStreamHandler(v1alphaPath, REFLECTION_RULE, boundary, serve) });
}
