/**
 * Member tokens: JWTs that act as one member. Two issuers are accepted — the operator's identity
 * provider (its JWKS, fetched and cached, fetched again for an unknown `kid` at most every 30 s) and
 * OnePoint itself (ES256 sessions signed with `MEMBER_TOKEN_KEY`, or outside production a key
 * generated once into the data folder). Everything is verified by `jose`, never by hand.
 */
import { createPrivateKey, generateKeyPairSync } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import {
	calculateJwkThumbprint,
	createLocalJWKSet,
	createRemoteJWKSet,
	decodeJwt,
	decodeProtectedHeader,
	exportJWK,
	importPKCS8,
	jwtVerify,
	SignJWT,
	type CryptoKey,
	type JWK,
	type JWTVerifyGetKey
} from "jose";

/** The `iss` of the sessions OnePoint issues. */
export const OWN_ISSUER = "onepoint";
/** A longer bearer token is refused before it is parsed. */
export const MAX_TOKEN_BYTES = 8192;
const ALGORITHMS = ["ES256", "RS256", "EdDSA"];
const CLOCK_SKEW_S = 30;
/** How often an unknown `kid` may send the gateway to the provider's JWKS again. */
const JWKS_COOLDOWN_MS = 30_000;
const KEY_FILE = "member-token-key.pem";
const MEMBER_ID = /^[A-Za-z0-9_-]{1,64}$/;

export interface OwnKey {
	privateKey: CryptoKey;
	/** The public half, as `GET /api/.well-known/jwks.json` publishes it. */
	jwk: JWK & { kid: string };
}

export interface OwnKeySource {
	/** `MEMBER_TOKEN_KEY`: keep it in `$secureSettings`. */
	memberTokenKey?: string;
	dataDir: string;
	production: boolean;
}

/** Who else may issue member tokens, and which of its claims holds the memberId. */
export interface IdentityProvider {
	jwksUrl: string;
	issuer: string;
	claim: string;
}

/**
 * OnePoint's signing key: `MEMBER_TOKEN_KEY`, or outside production the key in the data folder,
 * generated (mode 0600) by whichever process needs it first and read by the others.
 */
export async function loadOwnKey(source: OwnKeySource): Promise<OwnKey> {
	let pem = source.memberTokenKey;
	if (!pem) {
		if (source.production)
			throw new Error("MEMBER_TOKEN_KEY (a PEM private key for ES256) must be set in production");
		pem = ownKeyFile(source.dataDir);
	}
	const privateKey = await importPKCS8(pem, "ES256", { extractable: true });
	// The public half only: `d` never leaves this function.
	const { kty, crv, x, y } = await exportJWK(privateKey);
	const jwk = { kty, crv, x, y };
	return {
		privateKey,
		jwk: { ...jwk, kid: await calculateJwkThumbprint(jwk), alg: "ES256", use: "sig" }
	};
}

function ownKeyFile(dataDir: string): string {
	const file = path.join(dataDir, KEY_FILE);
	fs.mkdirSync(dataDir, { recursive: true });
	const pem = generateKeyPairSync("ec", { namedCurve: "P-256" })
		.privateKey.export({ type: "pkcs8", format: "pem" })
		.toString();
	try {
		// `wx`: another process that got there first keeps its key, and so do we.
		fs.writeFileSync(file, pem, { mode: 0o600, flag: "wx" });
	} catch (err) {
		if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
	}
	const stored = fs.readFileSync(file, "utf8");
	// A damaged file is refused here rather than at the first session.
	createPrivateKey(stored);
	return stored;
}

/** A session for `memberId`, valid `ttlS` seconds from `now`. */
export async function signSession(
	key: OwnKey,
	memberId: string,
	audience: string,
	ttlS: number,
	now: Date
): Promise<{ token: string; expiresAt: string }> {
	const issuedAt = Math.floor(now.getTime() / 1000);
	const token = await new SignJWT({})
		.setProtectedHeader({ alg: "ES256", kid: key.jwk.kid, typ: "JWT" })
		.setIssuer(OWN_ISSUER)
		.setAudience(audience)
		.setSubject(memberId)
		.setIssuedAt(issuedAt)
		.setNotBefore(issuedAt)
		.setExpirationTime(issuedAt + ttlS)
		.sign(key.privateKey);
	return { token, expiresAt: new Date((issuedAt + ttlS) * 1000).toISOString() };
}

/** Why a token was refused: a word for the log, with the `kid` it named (never the token). */
export class TokenRefused extends Error {
	constructor(
		readonly reason: string,
		readonly kid?: string
	) {
		super(reason);
	}
}

/** Whether a bearer token is shaped as a JWT (three dot-separated parts), not an API key. */
export function looksLikeJwt(token: string): boolean {
	return token.split(".").length === 3;
}

export interface Verifier {
	/** The member a token acts as, or `TokenRefused`. */
	verify(token: string, now: Date): Promise<string>;
}

/** Verifies OnePoint's own sessions and, when configured, the identity provider's tokens. */
export function memberTokenVerifier(
	own: OwnKey,
	audience: string,
	provider: IdentityProvider | undefined,
	timeoutMs: number
): Verifier {
	const issuers = new Map<string, { keys: JWTVerifyGetKey; claim: string }>([
		[OWN_ISSUER, { keys: createLocalJWKSet({ keys: [own.jwk] }), claim: "sub" }]
	]);
	if (provider)
		issuers.set(provider.issuer, {
			keys: createRemoteJWKSet(new URL(provider.jwksUrl), {
				cooldownDuration: JWKS_COOLDOWN_MS,
				timeoutDuration: timeoutMs
			}),
			claim: provider.claim
		});
	return {
		async verify(token, now) {
			if (Buffer.byteLength(token) > MAX_TOKEN_BYTES) throw new TokenRefused("too large");
			let kid: string | undefined;
			let issuer: string | undefined;
			try {
				kid = decodeProtectedHeader(token).kid;
				issuer = decodeJwt(token).iss;
			} catch {
				throw new TokenRefused("not a JWT");
			}
			// Which key set to verify with; `jwtVerify` checks the `iss` again, signed.
			const trusted = issuer === undefined ? undefined : issuers.get(issuer);
			if (!trusted) throw new TokenRefused("unknown issuer", kid);
			let payload: Record<string, unknown>;
			try {
				({ payload } = await jwtVerify(token, trusted.keys, {
					issuer,
					audience,
					algorithms: ALGORITHMS,
					clockTolerance: CLOCK_SKEW_S,
					currentDate: now,
					requiredClaims: ["exp"]
				}));
			} catch (err) {
				throw new TokenRefused((err as { code?: string }).code ?? "unverifiable", kid);
			}
			const memberId = payload[trusted.claim];
			if (typeof memberId !== "string" || !MEMBER_ID.test(memberId))
				throw new TokenRefused(`no memberId in '${trusted.claim}'`, kid);
			return memberId;
		}
	};
}
