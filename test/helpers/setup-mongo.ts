// The MongoDB project: every test file on a database of its own.
import "./setup-env";
import { freshDatabaseUri } from "./store";

process.env.MONGO_URI = freshDatabaseUri();
