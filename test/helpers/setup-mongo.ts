// The MongoDB project: every test file on a database of its own.
import mongoose from "mongoose";
import "./setup-env";
import { freshDatabaseUri } from "./store";

process.env.MONGO_URI = freshDatabaseUri();
// Mongoose formats a stack trace at every query, kept for one error ("Query was already executed")
// that the services never meet; under jest's source maps that was about 5% of a suite's time.
mongoose.set("skipOriginalStackTraces", true);
