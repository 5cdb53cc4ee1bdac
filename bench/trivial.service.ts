/** The benchmarks' baseline: an action that validates its params and answers with them, nothing else. */
import type { Context, ServiceSchema } from "moleculer";

const TrivialService: ServiceSchema = {
	name: "trivial",
	actions: {
		echo: {
			params: { $$strict: true, n: "number" },
			handler: (ctx: Context<{ n: number }>) => ctx.params
		}
	}
};

export default TrivialService;
