// Schema keys added by the mixins and middlewares this project uses.
import "moleculer";

/** A durable channel handler (@moleculer/channels). Method syntax lets handlers type their payload. */
interface ChannelHandler {
	group?: string;
	maxInFlight?: number;
	maxRetries?: number;
	handler(payload: unknown, raw?: unknown): Promise<void>;
}

declare module "moleculer" {
	interface ActionSchema {
		/** One line about a public action (one with `rest:`) in the published API contract (lib/gateway/openapi.ts). */
		summary?: string;
		/** The action's own request timeout (ms), which Moleculer's Timeout middleware reads; untyped in 0.15's typings. */
		timeout?: number;
	}

	interface ServiceSchema {
		channels?: Record<string, ChannelHandler>;
		/** Called with the schema once its mixins are merged, before the service is created. */
		merged?: (schema: ServiceSchema) => void;
		/** moleculer-db */
		afterConnected?: () => Promise<void> | void;
	}
}
