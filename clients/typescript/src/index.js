// neuroserve's typed client: openapi-fetch over the types generated from the server's own OpenAPI
// document (src/schema.d.ts), an API key sent on every request, and a helper for the streaming
// translation (server-sent events over a POST, which EventSource cannot send).
import createClient from "openapi-fetch";

/**
 * @param {string} baseUrl e.g. "http://127.0.0.1:8000"
 * @param {{ apiKey?: string, fetch?: typeof fetch }} [options]
 */
export function createNeuroserve(baseUrl, options = {}) {
  const client = createClient({ baseUrl, fetch: options.fetch });
  if (options.apiKey) {
    client.use({
      onRequest({ request }) {
        request.headers.set("X-API-Key", options.apiKey);
        return request;
      },
    });
  }
  return client;
}

/**
 * Translate texts, calling `onToken({index, token_id, text, end})` as each token arrives, and
 * resolving with the final answer (the `done` event); an `error` event rejects with the error body.
 * @param {string} baseUrl
 * @param {{ texts: string[], max_new_tokens?: number, model?: string }} body
 * @param {{ apiKey?: string, onToken?: (event: object) => void, signal?: AbortSignal }} [options]
 */
export async function translateStream(baseUrl, body, options = {}) {
  const headers = { "Content-Type": "application/json" };
  if (options.apiKey) headers["X-API-Key"] = options.apiKey;
  const response = await fetch(`${baseUrl}/v1/translation`, {
    method: "POST",
    headers,
    body: JSON.stringify({ ...body, stream: true }),
    signal: options.signal,
  });
  if (!response.ok) throw Object.assign(new Error(`HTTP ${response.status}`), { body: await response.json() });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const name = (event.match(/^event: (.*)$/m) || [])[1];
      const data = JSON.parse((event.match(/^data: (.*)$/m) || [null, "null"])[1]);
      if (name === "token" && options.onToken) options.onToken(data);
      if (name === "done") return data;
      if (name === "error") throw Object.assign(new Error(data.error), { body: data });
    }
  }
  throw new Error("the stream ended without a done event");
}
