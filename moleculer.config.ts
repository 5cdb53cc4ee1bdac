import { createBrokerOptions } from "./config/broker";

const options = createBrokerOptions();

// moleculer-runner then overwrites any broker option named by a variable (`TRACING` → `tracing`);
// config/index.ts has read `TRACING` already, as OnePoint's switch, not Moleculer's option.
delete process.env.TRACING;

// Read by moleculer-runner (`npm start`): one node with the options from the environment.
export = options;
