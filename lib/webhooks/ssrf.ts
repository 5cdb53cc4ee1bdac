/**
 * Which addresses a webhook may reach, so that a partner's URL cannot make OnePoint call into its own
 * network (server-side request forgery). In production a URL must be https and may not name a
 * loopback, private, link-local (cloud metadata), shared, multicast, reserved or unspecified address;
 * a host name is resolved at every delivery and refused if any of its addresses is one, and the
 * request then connects to the address that was checked (`resolveTarget`), so a name that resolves
 * elsewhere between the check and the connection (DNS rebinding) cannot slip through.
 */
import dns from "node:dns/promises";
import net from "node:net";

export interface AddressPolicy {
	/** Only https URLs (production). */
	requireHttps: boolean;
	/** Refuse the addresses of `BLOCKED` (production, unless WEBHOOK_ALLOW_PRIVATE=true). */
	blockPrivate: boolean;
}

/** Why a URL is refused: the error code a client gets when it names it. */
export type UrlRefusal = "WEBHOOK_URL_INVALID" | "WEBHOOK_URL_NOT_HTTPS" | "WEBHOOK_URL_PRIVATE";

export class RefusedUrl extends Error {
	constructor(
		readonly code: UrlRefusal,
		message: string
	) {
		super(message);
	}
}

const BLOCKED = new net.BlockList();
for (const [prefix, bits] of [
	["0.0.0.0", 8], // "this network", 0.0.0.0 itself
	["10.0.0.0", 8],
	["100.64.0.0", 10], // shared (carrier-grade NAT); also Alibaba's metadata 100.100.100.200
	["127.0.0.0", 8],
	["169.254.0.0", 16], // link-local: the clouds' metadata 169.254.169.254
	["172.16.0.0", 12],
	["192.0.0.0", 24],
	["192.0.2.0", 24],
	["192.88.99.0", 24],
	["192.168.0.0", 16],
	["198.18.0.0", 15],
	["198.51.100.0", 24],
	["203.0.113.0", 24],
	["224.0.0.0", 4], // multicast
	["240.0.0.0", 4] // reserved, and the broadcast address
] as const)
	BLOCKED.addSubnet(prefix, bits, "ipv4");
for (const [prefix, bits] of [
	["::", 96], // unspecified, loopback ::1, and the deprecated IPv4-compatible form
	["100::", 64], // discard
	["2001:db8::", 32], // documentation
	["fc00::", 7], // unique local: also AWS's metadata fd00:ec2::254
	["fe80::", 10], // link-local
	["fec0::", 10], // site-local (deprecated)
	["ff00::", 8] // multicast
] as const)
	BLOCKED.addSubnet(prefix, bits, "ipv6");

/** An IPv6 address as its eight 16-bit groups. */
function groupsOf(address: string): number[] {
	let text = address;
	const dotted = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
	if (dotted) {
		const [a, b, c, d] = dotted[1].split(".").map(Number);
		text = `${text.slice(0, dotted.index)}${((a << 8) | b).toString(16)}:${((c << 8) | d).toString(16)}`;
	}
	const [head, tail] = text.split("::");
	const parse = (part: string | undefined) =>
		part ? part.split(":").map(g => parseInt(g, 16)) : [];
	const [first, last] = [parse(head), parse(tail)];
	return tail === undefined
		? first
		: [...first, ...new Array<number>(8 - first.length - last.length).fill(0), ...last];
}

/**
 * The IPv4 address an IPv6 address carries to an IPv4 host: NAT64 (64:ff9b::/96) and 6to4
 * (2002::/16). (IPv4-mapped addresses, ::ffff:0:0/96, are matched against the IPv4 rules by BlockList.)
 */
function embeddedIpv4(address: string): string | undefined {
	const g = groupsOf(address);
	const quad = (hi: number, lo: number) => `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`;
	if (g[0] === 0x64 && g[1] === 0xff9b && g.slice(2, 6).every(x => x === 0))
		return quad(g[6], g[7]);
	if (g[0] === 0x2002) return quad(g[1], g[2]);
	return undefined;
}

/** Whether `address` (an IP literal) is one a webhook may not reach in production. */
export function isBlockedAddress(address: string): boolean {
	const family = net.isIP(address);
	if (family === 4) return BLOCKED.check(address, "ipv4");
	if (family !== 6) return true;
	if (BLOCKED.check(address, "ipv6")) return true;
	const ipv4 = embeddedIpv4(address);
	return ipv4 !== undefined && BLOCKED.check(ipv4, "ipv4");
}

/** The host of a URL as the resolver and `net.isIP` take it: without an IPv6 literal's brackets. */
const hostOf = (url: URL) => url.hostname.replace(/^\[(.*)\]$/, "$1");

/**
 * `raw` as the URL a webhook is created with, or the reason it is refused: not an http(s) URL, or one
 * with credentials in it (they would be shown in every listing); in production, not https, or naming a
 * blocked address itself (a host name is checked at each delivery, once resolved).
 */
export function checkUrl(raw: string, policy: AddressPolicy): URL {
	let url: URL;
	try {
		url = new URL(raw);
	} catch {
		throw new RefusedUrl("WEBHOOK_URL_INVALID", `'${raw}' is not a URL`);
	}
	if (url.protocol !== "https:" && url.protocol !== "http:")
		throw new RefusedUrl("WEBHOOK_URL_INVALID", "A webhook's URL must be http or https");
	if (url.username || url.password)
		throw new RefusedUrl(
			"WEBHOOK_URL_INVALID",
			"A webhook's URL may not carry credentials: verify deliveries by their signature"
		);
	if (policy.requireHttps && url.protocol !== "https:")
		throw new RefusedUrl("WEBHOOK_URL_NOT_HTTPS", "A webhook's URL must be https");
	const host = hostOf(url);
	if (policy.blockPrivate && net.isIP(host) && isBlockedAddress(host))
		throw new RefusedUrl(
			"WEBHOOK_URL_PRIVATE",
			"A webhook may not reach a loopback, private, link-local or metadata address"
		);
	return url;
}

/** The address a delivery connects to: checked, and the only one the request may use. */
export interface Target {
	address: string;
	family: 4 | 6;
}

export class BlockedAddress extends Error {}

/**
 * Where a delivery to `url` connects: its IP literal, or the first address its name resolves to now.
 * Refused (`BlockedAddress`) when the policy blocks any address the name resolves to (one of them
 * could be picked by another resolution), or the URL itself.
 */
export async function resolveTarget(url: URL, policy: AddressPolicy): Promise<Target> {
	const host = hostOf(url);
	if (policy.requireHttps && url.protocol !== "https:")
		throw new BlockedAddress("Not https in production");
	const family = net.isIP(host);
	const addresses = family
		? [{ address: host, family }]
		: await dns.lookup(host, { all: true, verbatim: true });
	if (policy.blockPrivate && addresses.some(a => isBlockedAddress(a.address)))
		throw new BlockedAddress(`${url.hostname} resolves to a blocked address`);
	const [first] = addresses;
	return { address: first.address, family: first.family === 6 ? 6 : 4 };
}
