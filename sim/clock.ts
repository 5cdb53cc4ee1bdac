/**
 * The simulation's clock. The services read time from `Date` (`new Date()`, `Date.now()`, a
 * service's `now()` method); in the simulation process `Date` is replaced by one that reads this
 * clock, which stands still until the simulation moves it. Timers (`setTimeout`) keep real time, as
 * Moleculer's call timeouts need: nothing in a seed waits for one (docs/simulation.md).
 */
const RealDate = Date;

export class SimClock {
	private ms = 0;

	get now(): number {
		return this.ms;
	}

	set(iso: string): void {
		this.ms = RealDate.parse(iso);
	}

	advance(ms: number): void {
		this.ms += ms;
	}

	iso(): string {
		return new RealDate(this.ms).toISOString();
	}

	/** From now on `Date` in this process reads this clock; `uninstall` gives the real one back. */
	install(): void {
		const read = () => this.ms;
		class SimDate extends RealDate {
			constructor(...args: unknown[]) {
				if (args.length === 0) super(read());
				else super(...(args as [string]));
			}
			static override now(): number {
				return read();
			}
		}
		globalThis.Date = SimDate as DateConstructor;
	}

	uninstall(): void {
		globalThis.Date = RealDate;
	}
}
