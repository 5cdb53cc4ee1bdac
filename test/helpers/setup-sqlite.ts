// The SQLite project: the embedded store, whatever MONGO_URI the shell has.
import "./setup-env";

delete process.env.MONGO_URI;
