/** @type {import('jest').Config} */
module.exports = {
	testEnvironment: "node",
	roots: ["<rootDir>/test"],
	testMatch: ["**/*.spec.ts"],
	transform: { "^.+\\.ts$": "ts-jest" },
	setupFiles: ["<rootDir>/test/helpers/setup-env.ts"],
	testTimeout: 30000
};
