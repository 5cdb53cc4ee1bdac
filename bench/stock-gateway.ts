/**
 * The gateway's yardstick: stock moleculer-web with its default settings on a broker with Moleculer's
 * defaults, answering `GET /api/me` from a trivial action. Run by the HTTP benchmark in a process of
 * its own (as the system's gateway is), on the port given as its argument; says "ready" when it listens.
 * With a second argument `metrics`, Moleculer's metrics are on (no reporter): what they cost stock
 * moleculer-web, beside what they cost ours.
 */
import { ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";

const broker = new ServiceBroker({ logger: false, metrics: process.argv[3] === "metrics" });
broker.createService({
	name: "api",
	mixins: [ApiGateway],
	settings: {
		port: Number(process.argv[2]),
		ip: "127.0.0.1",
		routes: [{ path: "/api", aliases: { "GET me": "who.me" } }]
	}
});
broker.createService({ name: "who", actions: { me: () => ({ role: "staff" }) } });
broker.start().then(
	() => process.send?.("ready"),
	err => {
		console.error(err);
		process.exit(1);
	}
);
