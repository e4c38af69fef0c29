// Drives the Dataverse simulator with the npm client dynamics-web-api, for tests/test_dataverse_clients.py.
//   node tests/clients/dynamics_web_api.mjs <scenario>     scenario: sync | throttle
// Environment: DATAVERSE_URL (the simulator), DATAVERSE_TOKEN (a token it accepts), NODE_EXTRA_CA_CERTS (its CA).
// Prints one JSON object: what each step returned or the error it raised (status, code, message, headers).
import { DynamicsWebApi } from "dynamics-web-api";

const api = new DynamicsWebApi({
  serverUrl: process.env.DATAVERSE_URL,
  dataApi: { version: "9.2" },
  onTokenRefresh: async () => process.env.DATAVERSE_TOKEN,
});

const out = {};

// Inside startBatch() each call returns a promise that settles with executeBatch(); its outcome is in the
// batch's answer, so the promise itself is only kept from going unhandled.
function queued(promise) {
  promise.catch(() => {});
}

async function step(name, run) {
  try {
    out[name] = { ok: (await run()) ?? null };
  } catch (err) {
    if (Array.isArray(err)) {  // a failed $batch: the client parses its multipart body into the parts' errors
      // Each failed part's error keeps the body's "error" object as a property of the same name.
      out[name] = { batchErrors: err.map((e) => ({ status: e.status ?? null, code: e.error?.code ?? null,
                                                   message: e.error?.message ?? null })) };
      return;
    }
    out[name] = {
      error: {
        status: err.status ?? null,
        code: err.code ?? null,
        message: err.message,
        retryAfter: err.headers?.["retry-after"] ?? null,
      },
    };
  }
}

async function sync() {
  let id;
  await step("create", async () => {
    const row = await api.create({
      collection: "contacts",
      data: { firstname: "Ada", lastname: "Lovelace", externaluseridentifier: "wavecnct_ada" },
      returnRepresentation: true,
      select: ["contactid", "lastname"],
    });
    id = row.contactid;
    return row;
  });
  await step("retrieve", () => api.retrieve({ collection: "contacts", key: id, select: ["firstname", "lastname"] }));
  await step("update", () => api.update({ collection: "contacts", key: id, data: { jobtitle: "Analyst" } }));
  await step("retrieveAfterUpdate", () => api.retrieve({ collection: "contacts", key: id, select: ["jobtitle"] }));
  // Upsert by the alternate key, the value an OData literal with its quote doubled.
  await step("upsertCreate", () =>
    api.upsert({ collection: "contacts", key: "externaluseridentifier='wavecnct_o''brien'",
                 data: { lastname: "O'Brien" }, returnRepresentation: true, select: ["contactid", "lastname"] }));
  await step("upsertUpdate", () =>
    api.upsert({ collection: "contacts", key: "externaluseridentifier='wavecnct_o''brien'",
                 data: { firstname: "Pat" }, returnRepresentation: true, select: ["contactid", "firstname"] }));
  await step("filterQuote", () =>
    api.retrieveMultiple({ collection: "contacts", select: ["lastname"], filter: "lastname eq 'O''Brien'" }));
  await step("createMultiple", () =>
    api.callAction({
      collection: "contacts",
      actionName: "Microsoft.Dynamics.CRM.CreateMultiple",
      action: { Targets: Array.from({ length: 23 }, (_, i) => ({ "@odata.type": "Microsoft.Dynamics.CRM.contact",
                                                                 lastname: `Page ${i}` })) },
    }));
  await step("upsertMultiple", () =>
    api.callAction({
      collection: "contacts",
      actionName: "Microsoft.Dynamics.CRM.UpsertMultiple",
      action: { Targets: [1, 2, 3].map((i) => ({ "@odata.type": "Microsoft.Dynamics.CRM.contact",
                                                 "@odata.id": `contacts(externaluseridentifier='wavecnct_bulk${i}')`,
                                                 lastname: `Bulk ${i}` })) },
    }));
  await step("firstPage", async () => {
    const page = await api.retrieveMultiple({ collection: "contacts", select: ["lastname"], maxPageSize: 10 });
    return { size: page.value.length, hasNext: Boolean(page.oDataNextLink) };
  });
  await step("retrieveAll", async () => {
    const all = await api.retrieveAll({ collection: "contacts", select: ["lastname"], maxPageSize: 10 });
    return all.value.length;
  });
  await step("countPath", () => api.count({ collection: "contacts" }));
  await step("countFiltered", () => api.count({ collection: "contacts", filter: "startswith(lastname,'Page')" }));
  await step("batchChangeSet", async () => {
    api.startBatch();
    queued(api.create({ collection: "contacts", data: { lastname: "Batch one" }, contentId: "1" }));
    queued(api.update({ contentId: "$1", data: { firstname: "Changed in the set" } }));
    queued(api.create({ collection: "contacts", data: { lastname: "Batch two" } }));
    return api.executeBatch();
  });
  await step("batchRollback", async () => {
    api.startBatch();
    queued(api.create({ collection: "contacts", data: { lastname: "Rolled back" } }));
    queued(api.create({ collection: "contacts", data: { lastname: "x".repeat(51) } }));
    return api.executeBatch();
  });
  await step("batchContinueOnError", async () => {
    api.startBatch();
    queued(api.retrieve({ collection: "contacts", key: id, select: ["lastname"] }));
    queued(api.retrieve({ collection: "contacts", key: "00000000-0000-4000-8000-000000000000",
                          select: ["lastname"] }));
    return api.executeBatch({ continueOnError: true });
  });
  await step("delete", () => api.deleteRecord({ collection: "contacts", key: id }));
  await step("retrieveDeleted", () => api.retrieve({ collection: "contacts", key: id }));
  await step("tooLong", () => api.create({ collection: "contacts", data: { lastname: "x".repeat(51) } }));
  await step("unknownColumn", () => api.create({ collection: "contacts", data: { nosuchcolumn: "x" } }));
  await step("badFilter", () =>
    api.retrieveMultiple({ collection: "contacts", filter: `Microsoft.Dynamics.CRM.In(PropertyName='lastname',PropertyValues=["O'Brien"])` }));
}

async function throttle() {
  const statuses = [];
  for (let i = 0; i < 6; i++) {
    await step(`create${i}`, () => api.create({ collection: "contacts", data: { lastname: `Throttled ${i}` } }));
    statuses.push(out[`create${i}`].error?.status ?? 204);
  }
  out.statuses = statuses;
}

const scenario = process.argv[2];
if (scenario === "sync") await sync();
else if (scenario === "throttle") await throttle();
else throw new Error(`unknown scenario ${scenario}`);
process.stdout.write(JSON.stringify(out));
