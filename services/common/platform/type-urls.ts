/** The `type_url` of google.protobuf.Any, from the generated code's type names rather than typed-in strings. */

/** The `type_url` of an Any that holds a message of `type` (a generated codec, which names its type in `$type`). */
export function typeUrlOf(type: { readonly $type: string }): string {
  return `type.googleapis.com/${type.$type}`;
}
