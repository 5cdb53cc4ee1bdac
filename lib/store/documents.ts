/**
 * MongoDB's query and update semantics for the common cases, in a few microseconds: mingo builds a
 * context of every operator it has on each query and each update, which made it most of a deal's
 * CPU on the embedded store. What is decided here is decided as MongoDB does; anything else (a path
 * through an array, an array or document as the operand, an operator not listed, types MongoDB orders
 * across) answers `undefined`, and the caller asks mingo.
 */
type Doc = Record<string, unknown>;

const MISSING = Symbol("missing");
const UNDECIDED = Symbol("undecided");

/** A document or sub-document (not an array, a date, a regular expression), from whichever realm. */
const isPlainObject = (value: unknown): value is Doc =>
	Object.prototype.toString.call(value) === "[object Object]";

/** `{ $op: … }`: a condition by operators, not a document to equal. */
const isOperators = (value: unknown): value is Doc =>
	isPlainObject(value) &&
	Object.keys(value).length > 0 &&
	Object.keys(value).every(key => key.startsWith("$"));

/** The value at a dotted path; `UNDECIDED` when the path goes through an array (MongoDB would look into its elements). */
function valueAt(doc: Doc, path: string): unknown {
	let value: unknown = doc;
	for (const key of path.split(".")) {
		if (Array.isArray(value)) return UNDECIDED;
		if (!isPlainObject(value)) return MISSING;
		value = key in value ? value[key] : MISSING;
	}
	return value;
}

const isScalar = (value: unknown) =>
	typeof value === "string" || typeof value === "number" || typeof value === "boolean";

/** `value == operand` as MongoDB's equality of a scalar or null operand with a value that is not an array. */
const equals = (value: unknown, operand: unknown) =>
	operand === null ? value === null || value === MISSING : value === operand;

/** A range in MongoDB's type brackets: numbers with numbers, strings with strings. */
function inRange(value: unknown, op: string, operand: unknown): boolean {
	if (typeof value !== typeof operand) return false;
	const [a, b] = [value as number | string, operand as number | string];
	return op === "$gt" ? a > b : op === "$gte" ? a >= b : op === "$lt" ? a < b : a <= b;
}

/** Whether `value` (not an array) meets `condition`; `UNDECIDED` for what is left to mingo. */
function meets(value: unknown, condition: unknown): boolean | typeof UNDECIDED {
	if (Array.isArray(value)) return UNDECIDED;
	if (!isOperators(condition)) {
		if (condition === null || isScalar(condition)) return equals(value, condition);
		return UNDECIDED;
	}
	for (const [op, operand] of Object.entries(condition)) {
		let met: boolean;
		if (op === "$eq" || op === "$ne") {
			if (operand !== null && !isScalar(operand)) return UNDECIDED;
			met = equals(value, operand) === (op === "$eq");
		} else if (op === "$gt" || op === "$gte" || op === "$lt" || op === "$lte") {
			if (typeof operand !== "number" && typeof operand !== "string") return UNDECIDED;
			met = inRange(value, op, operand);
		} else if (op === "$in" || op === "$nin") {
			if (!Array.isArray(operand) || !operand.every(v => v === null || isScalar(v)))
				return UNDECIDED;
			met = operand.some(v => equals(value, v)) === (op === "$in");
		} else if (op === "$exists") met = (value !== MISSING) === Boolean(operand);
		else return UNDECIDED;
		if (!met) return false;
	}
	return true;
}

/** Whether `doc` matches `query`; `undefined` when mingo must decide. */
export function matches(doc: Doc, query: Doc): boolean | undefined {
	let undecided = false;
	for (const [key, condition] of Object.entries(query)) {
		let met: boolean | undefined;
		if (key === "$and" || key === "$or") {
			if (!Array.isArray(condition) || condition.length === 0) return undefined;
			const parts = condition.map(part => matches(doc, part as Doc));
			met =
				key === "$and"
					? parts.includes(false)
						? false
						: parts.includes(undefined)
							? undefined
							: true
					: parts.includes(true)
						? true
						: parts.includes(undefined)
							? undefined
							: false;
		} else if (key.startsWith("$")) return undefined;
		else {
			const value = valueAt(doc, key);
			const result = value === UNDECIDED ? UNDECIDED : meets(value, condition);
			met = result === UNDECIDED ? undefined : result;
		}
		if (met === false) return false;
		if (met === undefined) undecided = true;
	}
	return undecided ? undefined : true;
}

/** MongoDB's order of two values of one type bracket (numbers, or strings); `undefined` across. */
function compare(a: unknown, b: unknown): number | undefined {
	if (typeof a === "number" && typeof b === "number") return a - b;
	if (typeof a === "string" && typeof b === "string") return a < b ? -1 : a > b ? 1 : 0;
	return undefined;
}

/** Where a path's value lives: its parent object (missing parents are made by a write) and its key. */
interface Slot {
	parent: Doc | undefined;
	parents: string[];
	key: string;
	value: unknown;
}

function slotOf(doc: Doc, path: string): Slot | undefined {
	const keys = path.split(".");
	let parent: Doc | undefined = doc;
	const parents: string[] = [];
	for (const key of keys.slice(0, -1)) {
		const next: unknown = parent?.[key];
		if (next === undefined && parent && !(key in parent)) parent = undefined;
		else if (isPlainObject(next)) parent = next;
		else if (parent) return undefined;
		parents.push(key);
	}
	const key = keys[keys.length - 1];
	return { parent, parents, key, value: parent && key in parent ? parent[key] : MISSING };
}

function put(doc: Doc, slot: Slot, value: unknown): void {
	let parent = slot.parent;
	if (!parent) {
		parent = doc;
		for (const key of slot.parents) parent = (parent[key] ??= {}) as Doc;
	}
	parent[slot.key] = value;
}

const OPERATORS = new Set(["$set", "$unset", "$inc", "$max", "$min", "$push", "$pull"]);

/**
 * Applies `modifier` to `doc` in place as MongoDB would (values are placed as they are, not copied:
 * the store serialises the document at once); whether it changed anything, or
 * `undefined` (and `doc` untouched) when mingo must do it: another operator, paths that overlap or
 * go through arrays, `_id`, values of types these operators do not take.
 */
export function applyModifier(doc: Doc, modifier: object): boolean | undefined {
	const changes: (() => boolean)[] = [];
	const paths: string[] = [];
	for (const [op, fields] of Object.entries(modifier)) {
		if (!OPERATORS.has(op) || !isPlainObject(fields)) return undefined;
		for (const [path, operand] of Object.entries(fields)) {
			if (path === "_id" || path.startsWith("_id.") || path.includes("$")) return undefined;
			paths.push(path);
			const slot = slotOf(doc, path);
			if (!slot) return undefined;
			const change = planned(doc, op, slot, operand);
			if (!change) return undefined;
			changes.push(change);
		}
	}
	const sorted = [...paths].sort();
	for (let i = 1; i < sorted.length; i++)
		if (sorted[i] === sorted[i - 1] || sorted[i].startsWith(`${sorted[i - 1]}.`)) return undefined;
	let changed = false;
	for (const change of changes) changed = change() || changed;
	return changed;
}

/** The change one operator makes at one path, or `undefined` when it is left to mingo. */
function planned(doc: Doc, op: string, slot: Slot, operand: unknown): (() => boolean) | undefined {
	const { value } = slot;
	switch (op) {
		case "$set":
			if (
				operand !== null &&
				!isScalar(operand) &&
				!isPlainObject(operand) &&
				!Array.isArray(operand)
			)
				return undefined;
			return () => {
				if (isScalar(operand) && value === operand) return false;
				put(doc, slot, operand);
				return true;
			};
		case "$unset":
			return () => {
				if (value === MISSING || !slot.parent) return false;
				delete slot.parent[slot.key];
				return true;
			};
		case "$inc":
			if (typeof operand !== "number" || (value !== MISSING && typeof value !== "number"))
				return undefined;
			return () => {
				put(doc, slot, value === MISSING ? operand : (value as number) + operand);
				return operand !== 0 || value === MISSING;
			};
		case "$max":
		case "$min": {
			if (value === MISSING)
				return isScalar(operand) || operand === null
					? () => (put(doc, slot, operand), true)
					: undefined;
			const order = compare(operand, value);
			if (order === undefined) return undefined;
			return () => {
				if (op === "$max" ? order <= 0 : order >= 0) return false;
				put(doc, slot, operand);
				return true;
			};
		}
		case "$push": {
			if (value !== MISSING && !Array.isArray(value)) return undefined;
			let items: unknown[] = [operand];
			if (isPlainObject(operand) && Object.keys(operand).some(k => k.startsWith("$"))) {
				if (Object.keys(operand).join() !== "$each" || !Array.isArray(operand.$each))
					return undefined;
				items = operand.$each;
			}
			return () => {
				if (value === MISSING) put(doc, slot, [...items]);
				else (value as unknown[]).push(...items);
				return items.length > 0 || value === MISSING;
			};
		}
		case "$pull": {
			if (value === MISSING) return () => false;
			if (!Array.isArray(value)) return undefined;
			const decided = value.map(item => pulls(item, operand));
			if (decided.includes(undefined)) return undefined;
			return () => {
				const kept = value.filter((_, i) => !decided[i]);
				if (kept.length === value.length) return false;
				put(doc, slot, kept);
				return true;
			};
		}
	}
	return undefined;
}

/** Whether `$pull`'s condition takes `item`: a value equal to it, a condition it meets, or a query its document matches. */
function pulls(item: unknown, condition: unknown): boolean | undefined {
	if (Array.isArray(item)) return undefined;
	if (isPlainObject(condition) && !Object.keys(condition).some(k => k.startsWith("$"))) {
		if (!isPlainObject(item)) return false;
		return matches(item, condition);
	}
	if (isPlainObject(item)) return isPlainObject(condition) ? undefined : false;
	const met = meets(item, condition);
	return met === UNDECIDED ? undefined : met;
}
