/**
 * Services take their configuration from their `settings`, never from `config` directly. The
 * defaults come from the configuration of the node (broker) the service runs on, which is the
 * environment read at start-up (`config`) unless the broker was made with another
 * (`createBrokerOptions(loadConfig(env))`, as a test's broker is). A schema's own `settings` (or a
 * test's `withSettings`) win over those defaults.
 */
import type { Middleware, Service, ServiceBroker, ServiceSchema } from "moleculer";
import { config as processConfig, type Config } from ".";

const configs = new WeakMap<ServiceBroker, Config>();

/** The broker middleware that makes `config` the configuration of the node it runs on. */
export function NodeConfig(config: Config): Middleware {
	return {
		name: "NodeConfig",
		created(broker: ServiceBroker) {
			configs.set(broker, config);
		}
	} as Middleware;
}

/** The configuration of the node `broker` is. */
export function configOf(broker: ServiceBroker): Config {
	return configs.get(broker) ?? processConfig;
}

type Plain = Record<string, unknown>;
const isPlain = (value: unknown): value is Plain =>
	typeof value === "object" && value !== null && Object.getPrototypeOf(value) === Object.prototype;

/** `settings` with whatever it leaves out taken from `defaults`, also inside nested objects. */
export function withDefaults(settings: Plain, defaults: Plain): Plain {
	const merged: Plain = { ...defaults, ...settings };
	for (const [key, value] of Object.entries(defaults))
		if (isPlain(value) && isPlain(settings[key]))
			merged[key] = withDefaults(settings[key] as Plain, value);
	return merged;
}

/**
 * A mixin: settings whose defaults `defaults` draws from the node's configuration, filled in once
 * the schema is merged (before the service is created, so mixins such as moleculer-web see them).
 */
export function ConfiguredSettings<S extends object>(
	defaults: (config: Config) => Partial<S>
): Partial<ServiceSchema> {
	return {
		merged(this: Service, schema: ServiceSchema) {
			schema.settings = withDefaults(
				(schema.settings ?? {}) as Plain,
				defaults(configOf(this.broker)) as Plain
			);
		}
	};
}
