import { createBrokerOptions } from "./config/broker";

// Read by moleculer-runner (`npm start`): one node with the options from the environment.
export = createBrokerOptions();
