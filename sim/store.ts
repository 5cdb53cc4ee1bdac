/**
 * The store wrapper the simulator fails. Every service reads and writes its collections through
 * `Collection` (mixins/db.mixin.ts); the simulation wraps its methods (in this process only) so
 * that, as a seed's plan says, the Nth write of a service fails (nothing written), or is written but
 * answers an error (a lost acknowledgement), or is written and then the service dies: every later
 * read or write of that service instance fails, until the simulator starts a new instance on the
 * same store — a process stopped between two of its writes and started again.
 */
import type { Service } from "moleculer";
import { Collection } from "../mixins/db.mixin";

export type StoreFaultKind = "write-fails" | "write-unacknowledged" | "crash-after-write";

export interface StoreFault {
	kind: StoreFaultKind;
	service: string;
	/** Which of the service's writes from now on (1: the next). */
	nth: number;
}

/** What a dead service instance's store calls meet. */
export class SimCrash extends Error {
	constructor(readonly service: string) {
		super(`simulated crash: the '${service}' instance is dead`);
	}
}

/** A store write the simulator failed. */
export class SimStoreError extends Error {}

const WRITES = ["insertUnique", "update", "upsert", "remove"] as const;
const READS = ["findById", "find", "count"] as const;

type AnyCollection = Collection<{ _id: string }>;
type Method = (this: AnyCollection, ...args: unknown[]) => Promise<unknown>;

/** The simulation running in this process, if any. */
const current: { faults?: StoreFaults } = {};
let installed = false;

/** Wraps Collection's methods once per process; they go straight through unless a simulation is active. */
function install(): void {
	if (installed) return;
	installed = true;
	const proto = Collection.prototype as unknown as Record<string, Method>;
	for (const name of [...WRITES, ...READS]) {
		const original = proto[name];
		const write = (WRITES as readonly string[]).includes(name);
		proto[name] = function (this: AnyCollection, ...args: unknown[]) {
			const run = () => original.apply(this, args);
			return current.faults ? current.faults.around(this, write, run) : run();
		};
	}
}

export class StoreFaults {
	private readonly owners = new WeakMap<AnyCollection, string>();
	private readonly dead = new WeakSet<AnyCollection>();
	private readonly live = new Map<string, Set<AnyCollection>>();
	private readonly counted = new Map<string, number>();
	private armed?: StoreFault & { at: number };
	/** Called when a service dies, so that the simulator starts it again. */
	onCrash: (service: string) => void = () => undefined;
	/** Called when an armed fault fires, for the trace. */
	onFault: (what: string) => void = () => undefined;

	activate(): void {
		install();
		current.faults = this;
	}

	deactivate(): void {
		if (current.faults === this) current.faults = undefined;
	}

	/** Learns which collections `service` reads and writes (its own properties that are collections). */
	adopt(service: Service): void {
		const mine = new Set<AnyCollection>();
		for (const value of Object.values(service))
			if (value instanceof Collection) {
				this.owners.set(value as AnyCollection, service.name);
				mine.add(value as AnyCollection);
			}
		this.live.set(service.name, mine);
	}

	arm(fault: StoreFault): void {
		this.armed = { ...fault, at: (this.counted.get(fault.service) ?? 0) + fault.nth };
	}

	disarm(): StoreFault | undefined {
		const armed = this.armed;
		this.armed = undefined;
		return armed;
	}

	async around(collection: AnyCollection, write: boolean, run: () => Promise<unknown>) {
		const owner = this.owners.get(collection);
		if (this.dead.has(collection)) throw new SimCrash(owner ?? collection.name);
		if (!write || !owner) return run();
		const n = (this.counted.get(owner) ?? 0) + 1;
		this.counted.set(owner, n);
		const armed = this.armed;
		if (!armed || armed.service !== owner || armed.at !== n) return run();
		this.armed = undefined;
		const where = `${owner}'s write #${n} (${collection.name})`;
		if (armed.kind === "write-fails") {
			this.onFault(`${where} failed`);
			throw new SimStoreError(`simulated store failure: ${where}`);
		}
		const result = await run();
		if (armed.kind === "write-unacknowledged") {
			this.onFault(`${where} written, then failed`);
			throw new SimStoreError(`simulated lost acknowledgement: ${where}`);
		}
		this.onFault(`${owner} died after its write #${n} (${collection.name})`);
		for (const mine of this.live.get(owner) ?? []) this.dead.add(mine);
		this.onCrash(owner);
		return result;
	}
}
