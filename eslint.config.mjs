import js from "@eslint/js";
import tseslint from "typescript-eslint";

export default tseslint.config(
	{ ignores: ["dist/", "node_modules/", "data/", "coverage/", "public/vendor/"] },
	js.configs.recommended,
	...tseslint.configs.recommended,
	{
		rules: {
			"@typescript-eslint/no-unused-vars": [
				"error",
				{ argsIgnorePattern: "^_", varsIgnorePattern: "^_", destructuredArrayIgnorePattern: "^_" }
			]
		}
	},
	{
		files: ["test/**/*.ts"],
		rules: { "@typescript-eslint/no-explicit-any": "off" }
	},
	{
		files: ["public/**/*.js"],
		languageOptions: {
			sourceType: "script",
			globals: {
				document: "readonly",
				window: "readonly",
				fetch: "readonly",
				sessionStorage: "readonly",
				setTimeout: "readonly",
				clearTimeout: "readonly",
				TextDecoderStream: "readonly",
				Chart: "readonly"
			}
		}
	},
	{
		files: ["*.js", "*.mjs"],
		languageOptions: {
			globals: {
				module: "readonly",
				require: "readonly",
				__dirname: "readonly",
				process: "readonly",
				console: "readonly"
			}
		},
		rules: { "@typescript-eslint/no-require-imports": "off" }
	}
);
