// The API reference: Swagger UI (served from the package, no CDN) over the contract the gateway
// generates from its routes. "Authorize" takes a token from API_KEYS for "Try it out".
/* global SwaggerUIBundle */
window.addEventListener("DOMContentLoaded", () => {
	SwaggerUIBundle({
		url: "/api/openapi.json",
		dom_id: "#reference",
		deepLinking: true,
		// No validator badge: it would send the contract to validator.swagger.io.
		validatorUrl: null,
		presets: [SwaggerUIBundle.presets.apis]
	});
});
