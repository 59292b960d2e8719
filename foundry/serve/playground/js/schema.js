// Checking a reply against a JSON schema, in the page, to show that what the server's grammar produced
// matches. The keywords of structured output are checked (type, enum, const, properties, required,
// additionalProperties, items, prefixItems, min/maxItems, uniqueItems, min/maxLength, pattern, minimum,
// maximum, exclusive bounds, multipleOf, anyOf, oneOf, allOf, not, local $ref); any other keyword is
// reported as not checked, never silently passed.

const CHECKED = new Set([
  "type", "enum", "const", "properties", "required", "additionalProperties", "items", "prefixItems",
  "minItems", "maxItems", "uniqueItems", "minLength", "maxLength", "pattern", "minimum", "maximum",
  "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "anyOf", "oneOf", "allOf", "not", "$ref",
  "minProperties", "maxProperties",
  // annotations: they constrain nothing
  "$schema", "$id", "$defs", "definitions", "title", "description", "default", "examples", "$comment",
]);

function typeOf(value) {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  if (typeof value === "number") return Number.isInteger(value) ? "integer" : "number";
  return typeof value; // string, boolean, object
}

function hasType(value, type) {
  const actual = typeOf(value);
  return actual === type || (type === "number" && actual === "integer");
}

function equal(a, b) {
  return JSON.stringify(canonical(a)) === JSON.stringify(canonical(b));
}

function canonical(value) {
  if (Array.isArray(value)) return value.map(canonical);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.keys(value).sort().map((k) => [k, canonical(value[k])]));
  }
  return value;
}

function resolve(root, ref) {
  if (!ref.startsWith("#")) throw new Error(`$ref ${ref}: only references inside the schema are followed`);
  let node = root;
  for (const part of ref.slice(1).split("/").filter(Boolean)) {
    node = node?.[part.replaceAll("~1", "/").replaceAll("~0", "~")];
  }
  if (node === undefined) throw new Error(`$ref ${ref} points at nothing`);
  return node;
}

/** {errors: ["$.age: 130 is above the maximum 120", ...], unchecked: ["format", ...]} */
export function validate(value, schema) {
  const errors = [];
  const unchecked = new Set();
  check(value, schema, "$", schema, errors, unchecked, 0);
  return { errors, unchecked: [...unchecked].sort() };
}

function check(value, schema, path, root, errors, unchecked, depth) {
  if (depth > 64) throw new Error("the schema nests (or refers to itself) too deeply");
  if (schema === true || schema === undefined) return;
  if (schema === false) {
    errors.push(`${path}: no value is allowed here`);
    return;
  }
  for (const key of Object.keys(schema)) if (!CHECKED.has(key)) unchecked.add(key);
  const sub = (v, s, p, out = errors) => check(v, s, p, root, out, unchecked, depth + 1);
  const passes = (v, s) => {
    const out = [];
    sub(v, s, path, out);
    return out.length === 0;
  };

  if (schema.$ref) sub(value, resolve(root, schema.$ref), path);
  if (schema.type !== undefined) {
    const types = [].concat(schema.type);
    if (!types.some((t) => hasType(value, t))) {
      errors.push(`${path}: ${typeOf(value)} where ${types.join(" or ")} is required`);
      return;
    }
  }
  if (schema.enum && !schema.enum.some((e) => equal(e, value))) {
    errors.push(`${path}: ${JSON.stringify(value)} is not one of ${JSON.stringify(schema.enum)}`);
  }
  if ("const" in schema && !equal(schema.const, value)) {
    errors.push(`${path}: ${JSON.stringify(value)} is not ${JSON.stringify(schema.const)}`);
  }
  for (const s of schema.allOf || []) sub(value, s, path);
  if (schema.anyOf && !schema.anyOf.some((s) => passes(value, s))) errors.push(`${path}: matches none of anyOf`);
  if (schema.oneOf) {
    const n = schema.oneOf.filter((s) => passes(value, s)).length;
    if (n !== 1) errors.push(`${path}: matches ${n} of oneOf's schemas, not exactly one`);
  }
  if (schema.not !== undefined && passes(value, schema.not)) errors.push(`${path}: matches the schema under not`);

  const kind = typeOf(value);
  if (kind === "string") {
    const length = [...value].length; // code points, as JSON Schema counts
    if (schema.minLength !== undefined && length < schema.minLength) errors.push(`${path}: shorter than ${schema.minLength}`);
    if (schema.maxLength !== undefined && length > schema.maxLength) errors.push(`${path}: longer than ${schema.maxLength}`);
    if (schema.pattern !== undefined && !new RegExp(schema.pattern, "u").test(value)) {
      errors.push(`${path}: does not match the pattern ${schema.pattern}`);
    }
  }
  if (kind === "integer" || kind === "number") {
    if (schema.minimum !== undefined && value < schema.minimum) errors.push(`${path}: ${value} is below the minimum ${schema.minimum}`);
    if (schema.maximum !== undefined && value > schema.maximum) errors.push(`${path}: ${value} is above the maximum ${schema.maximum}`);
    if (schema.exclusiveMinimum !== undefined && value <= schema.exclusiveMinimum) errors.push(`${path}: ${value} is not above ${schema.exclusiveMinimum}`);
    if (schema.exclusiveMaximum !== undefined && value >= schema.exclusiveMaximum) errors.push(`${path}: ${value} is not below ${schema.exclusiveMaximum}`);
    if (schema.multipleOf !== undefined && !Number.isInteger(value / schema.multipleOf)) errors.push(`${path}: ${value} is not a multiple of ${schema.multipleOf}`);
  }
  if (kind === "array") {
    if (schema.minItems !== undefined && value.length < schema.minItems) errors.push(`${path}: fewer than ${schema.minItems} items`);
    if (schema.maxItems !== undefined && value.length > schema.maxItems) errors.push(`${path}: more than ${schema.maxItems} items`);
    if (schema.uniqueItems && new Set(value.map((v) => JSON.stringify(canonical(v)))).size !== value.length) {
      errors.push(`${path}: items repeat`);
    }
    const prefix = schema.prefixItems || [];
    value.forEach((item, i) => {
      if (i < prefix.length) sub(item, prefix[i], `${path}[${i}]`);
      else if (schema.items !== undefined) sub(item, schema.items, `${path}[${i}]`);
    });
  }
  if (kind === "object") {
    const keys = Object.keys(value);
    for (const name of schema.required || []) if (!(name in value)) errors.push(`${path}: ${name} is missing`);
    if (schema.minProperties !== undefined && keys.length < schema.minProperties) errors.push(`${path}: fewer than ${schema.minProperties} properties`);
    if (schema.maxProperties !== undefined && keys.length > schema.maxProperties) errors.push(`${path}: more than ${schema.maxProperties} properties`);
    const properties = schema.properties || {};
    for (const key of keys) {
      const at = `${path}.${key}`;
      if (key in properties) sub(value[key], properties[key], at);
      else if (schema.additionalProperties !== undefined) sub(value[key], schema.additionalProperties, at);
    }
  }
}
