/**
 * Two projects, one per store: every service and end-to-end suite runs on SQLite (the embedded
 * default) and on MongoDB (the stand-in under test/mongo, or the server at MONGO_URI). Suites about
 * one store only (the stand-in itself, several instances sharing MongoDB: `mongo-*.spec.ts`; the SQLite
 * file: `sqlite-file.spec.ts`) run in that store's project; suites about neither (configuration,
 * deployment files, the channel adapters, the patches, the docs checks, pure rules, the benchmark's
 * smoke run) run once, in the SQLite project.
 */
const common = {
	testEnvironment: "node",
	roots: ["<rootDir>/test"],
	transform: {
		"^.+\\.ts$": "ts-jest",
		// jose ships ES modules only: Node 22 requires them as they are, jest's CommonJS runtime cannot.
		"/node_modules/jose/.+\\.js$": ["ts-jest", { tsconfig: { allowJs: true }, diagnostics: false }]
	},
	transformIgnorePatterns: ["/node_modules/(?!jose/)"]
};

// Independent of the store, or about SQLite only: run once, in the SQLite project.
const storeless = [
	"config",
	"openapi",
	"deployment",
	"bench.e2e",
	"embedded-channel-adapter",
	"sqlite-file",
	"sqlite-documents",
	"nats-channel-adapter",
	"nats-cluster",
	"nodes.e2e",
	"metric-rate-shape",
	"patches",
	"channels-doc",
	"channel-adapter-contract",
	"transient-errors",
	"gateway-patch",
	"gateway-breaker",
	"posting",
	"docs-links",
	"service-wait",
	"monitoring",
	// A million entries imported from a NeDB file (the MongoDB side: test/unit/exports.spec.ts).
	"ledger-export.e2e"
].map(name => `/test/(unit|e2e)/${name}\\.spec\\.ts$`);

/** @type {import('jest').Config} */
module.exports = {
	testTimeout: 30000,
	projects: [
		{
			...common,
			displayName: "sqlite",
			testMatch: ["**/test/unit/**/*.spec.ts", "**/test/e2e/**/*.spec.ts"],
			// MongoDB only: the stand-in, and several instances sharing one store.
			testPathIgnorePatterns: ["/test/(unit|e2e)/mongo-[^/]*\\.spec\\.ts$"],
			setupFiles: ["<rootDir>/test/helpers/setup-sqlite.ts"]
		},
		{
			...common,
			displayName: "mongodb",
			testMatch: ["**/test/unit/**/*.spec.ts", "**/test/e2e/**/*.spec.ts"],
			testPathIgnorePatterns: storeless,
			setupFiles: ["<rootDir>/test/helpers/setup-mongo.ts"],
			globalSetup: "<rootDir>/test/helpers/mongo-setup.ts",
			globalTeardown: "<rootDir>/test/helpers/mongo-teardown.ts"
		}
	]
};
