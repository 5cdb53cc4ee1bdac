// Schema keys added by the mixins and middlewares this project uses.
import "moleculer";

declare module "moleculer" {
	interface ServiceSchema {
		/** @moleculer/channels: durable channel handlers. */
		channels?: Record<string, { group?: string; maxInFlight?: number; maxRetries?: number; handler: (payload: any, raw?: unknown) => Promise<void> }>;
		/** moleculer-db */
		adapter?: unknown;
		model?: unknown;
		afterConnected?: () => Promise<void> | void;
	}
}
