import type { Client } from "openapi-fetch";
import type { components, paths } from "./schema.js";

export type { components, paths };
export type TranslationResponse = components["schemas"]["TranslationResponse"];
export interface TokenEvent {
  index: number;
  token_id: number;
  text: string;
  end: boolean;
}

// Typed as the JSON answers: routes that can also answer image/png (render) or text/event-stream
// (stream) had their data typed as the union of the two, so `data.images` did not compile.
export function createNeuroserve(
  baseUrl: string,
  options?: { apiKey?: string; fetch?: typeof fetch },
): Client<paths, "application/json">;

export function translateStream(
  baseUrl: string,
  body: { texts: string[]; max_new_tokens?: number; model?: string },
  options?: { apiKey?: string; onToken?: (event: TokenEvent) => void; signal?: AbortSignal },
): Promise<TranslationResponse>;
