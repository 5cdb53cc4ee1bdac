import type { Service, ServiceBroker } from "moleculer";
import MembersService from "../../services/members.service";
import PointsService from "../../services/points.service";
import { createTestBroker, eventually } from "../helpers/broker";

describe("members service", () => {
	let broker: ServiceBroker;

	beforeAll(async () => {
		broker = createTestBroker([MembersService, PointsService]);
		await broker.start();
	});
	afterAll(() => broker.stop());

	it("joins a member, generating an id when none is given", async () => {
		const member = await broker.call<{ memberId: string; status: string }, object>("members.join", {
			name: "Kim",
			phone: "010-1234-5678"
		});
		expect(member).toMatchObject({
			name: "Kim",
			phone: "010-1234-5678",
			email: null,
			status: "active"
		});
		expect(member.memberId).toMatch(/^\d{8}$/);
		expect(await broker.call("members.get", { memberId: member.memberId })).toEqual(member);
	});

	it("refuses a taken memberId with 409 and keeps the first member", async () => {
		await broker.call("members.join", { memberId: "0001", name: "Kim" });
		await expect(
			broker.call("members.join", { memberId: "0001", name: "Other" })
		).rejects.toMatchObject({
			code: 409,
			type: "MEMBER_EXISTS"
		});
		expect(await broker.call("members.get", { memberId: "0001" })).toMatchObject({ name: "Kim" });
	});

	it("answers 404 for an unknown member", async () => {
		await expect(broker.call("members.get", { memberId: "nobody" })).rejects.toMatchObject({
			code: 404,
			type: "MEMBER_NOT_FOUND"
		});
	});

	it("refuses bad input with 422", async () => {
		await expect(broker.call("members.join", {})).rejects.toMatchObject({ code: 422 });
		await expect(
			broker.call("members.join", { name: "A", email: "not-an-email" })
		).rejects.toMatchObject({ code: 422 });
		await expect(broker.call("members.join", { name: "A", isAdmin: true })).rejects.toMatchObject({
			code: 422
		});
	});

	it("keeps joining while points is down; the account appears once points is back", async () => {
		const points = broker.getLocalService("points") as Service;
		await broker.destroyService(points);
		await broker.call("members.join", { memberId: "0100", name: "Park" });
		await expect(broker.call("points.get", { memberId: "0100" })).rejects.toMatchObject({
			type: "SERVICE_NOT_AVAILABLE"
		});
		broker.createService(PointsService);
		await broker.waitForServices("points");
		await eventually(async () =>
			expect(await broker.call("points.get", { memberId: "0100" })).toMatchObject({
				balance: 0,
				status: "active"
			})
		);
	});

	it("withdraws once: the account closes, a second withdrawal is 409", async () => {
		await broker.call("members.join", { memberId: "0200", name: "Choi" });
		expect(await broker.call("members.withdraw", { memberId: "0200" })).toMatchObject({
			status: "withdrawn"
		});
		await expect(broker.call("members.withdraw", { memberId: "0200" })).rejects.toMatchObject({
			code: 409,
			type: "MEMBER_WITHDRAWN"
		});
		await expect(broker.call("members.withdraw", { memberId: "0299" })).rejects.toMatchObject({
			code: 404
		});
		await eventually(async () =>
			expect(await broker.call("points.get", { memberId: "0200" })).toMatchObject({
				status: "closed"
			})
		);
	});
});
