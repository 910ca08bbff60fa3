// The client against a live server: NEUROSERVE_URL (and NEUROSERVE_API_KEY when it needs one).
import assert from "node:assert/strict";
import { test } from "node:test";

import { createNeuroserve, translateStream } from "../src/index.js";

const url = process.env.NEUROSERVE_URL ?? "http://127.0.0.1:8000";
const apiKey = process.env.NEUROSERVE_API_KEY;
const api = createNeuroserve(url, { apiKey });
// A 28x28 PNG of a handwritten 7 from the MNIST test set.
const SEVEN =
  "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAAAwUlEQVR42mNgGDaAEUKFpD77sfTFHeyS9xQYGBg+" +
  "X4UKPuk6w8DAwMDAAuGm6l/TMnSweCzLwPDntSTDozPIOhkYGBgYBA3PmDIw/Lh1XShnGi5nBP+9KIRLTuzl/2Ao" +
  "kwlDMlv0/U1cGq1//rPD6fHWf7tZcclxnv1hhVNj3b9tOOW8f3+wxCUnfPffMlxyzKf/3VbGJan2758vLjn5B/+K" +
  "GXF78Z8JLjnbT+iSSGFrw8Nw9wuKJAsy56LzO+ITGABpETyQcCy90wAAAABJRU5ErkJggg==";

test("the server is ready", async () => {
  const { data, response } = await api.GET("/v2/health/ready");
  assert.equal(response.status, 200);
  assert.equal(data.ready, true);
});

test("a handwritten 7 is classified as 7", async () => {
  const { data, error } = await api.POST("/v1/image-classification", { body: { images: [SEVEN], top_k: 3 } });
  assert.equal(error, undefined);
  assert.equal(data.model, "mnist");
  assert.equal(data.predictions[0][0].label, "7");
});

test("a 7 is not flagged as unlike a digit", async () => {
  const { data } = await api.POST("/v1/image-classification", { body: { images: [SEVEN] } });
  assert.equal(data.ood.length, 1);
  assert.equal(data.ood[0].flagged, false);
});

test("a drawn number comes back as PNGs with their seeds", async () => {
  const { data, error } = await api.POST("/v1/image-generation", { body: { digits: "42", n: 2, seed: 5 } });
  assert.equal(error, undefined);
  assert.deepEqual(data.images.map((i) => i.seed), [5, 6]);
  assert.equal(Buffer.from(data.images[0].png, "base64").subarray(1, 4).toString(), "PNG");
});

test("sentiment names the model of each text's language", async () => {
  const { data } = await api.POST("/v1/sentiment", { body: { texts: ["What a wonderful film.", "房间干净，服务热情。"] } });
  assert.deepEqual(data.predictions.map((p) => p.model), ["sentiment", "sentiment-zh"]);
  assert.equal(data.predictions[0].label, "positive");
});

test("a translation streams token by token, then the whole answer", async () => {
  const tokens = [];
  const done = await translateStream(url, { texts: ["Where is the train station?"] }, { apiKey, onToken: (t) => tokens.push(t) });
  assert.ok(tokens.length >= 3, `only ${tokens.length} token events`);
  assert.ok(tokens.at(-1).end);
  assert.match(done.translations[0].text, /gare/);
});

test("a completion comes back in OpenAI's shape, the same for the same seed", async () => {
  const body = { model: "text-generator", prompt: "I think that", max_tokens: 12, temperature: 0.8, seed: 7 };
  const first = await api.POST("/v1/completions", { body });
  const again = await api.POST("/v1/completions", { body });
  assert.equal(first.error, undefined);
  assert.equal(first.data.object, "text_completion");
  assert.ok(["stop", "length"].includes(first.data.choices[0].finish_reason));
  assert.ok(first.data.usage.completion_tokens <= 12);
  assert.equal(first.data.choices[0].text, again.data.choices[0].text);
  const missing = await api.POST("/v1/completions", { body: { ...body, model: "nope" } });
  assert.equal(missing.response.status, 404);
  assert.equal(missing.error.error.code, "model_not_found");
});

test("a mistake comes back in the error shape", async () => {
  const { error, response } = await api.POST("/v1/recommendations", { body: { user_id: "not-an-id", k: 3 } });
  assert.equal(response.status, 400);
  assert.equal(error.error_type, "invalid_id");
});
