// Conduit's Responses API through the Vercel AI SDK's OpenAI provider (`@ai-sdk/openai`, its
// `responses()` model): generateText and streamText, and an error. Exits non-zero on any failed
// check; prints one JSON line (texts, usage, response id) for the pytest caller.
import assert from 'node:assert/strict';
import { createOpenAI } from '@ai-sdk/openai';
import { APICallError, generateText, streamText } from 'ai';

const MODEL = process.env.CONDUIT_MODEL ?? 'conduit-demo';
const MAX_TOKENS = 12;
const openai = createOpenAI({ baseURL: `${process.env.CONDUIT_URL}/v1`, apiKey: 'unused' });
const request = {
  model: openai.responses(MODEL),
  system: 'Be brief.',
  prompt: 'Hello there',
  maxOutputTokens: MAX_TOKENS,
  temperature: 0,
  maxRetries: 0,
};

function checkUsage(usage) {
  assert.ok(usage.inputTokens > 0, `inputTokens: ${usage.inputTokens}`);
  assert.ok(usage.outputTokens > 0 && usage.outputTokens <= MAX_TOKENS, `outputTokens: ${usage.outputTokens}`);
  assert.equal(usage.totalTokens, usage.inputTokens + usage.outputTokens);
}

const generated = await generateText(request);
assert.ok(generated.text.length > 0, 'generateText returned no text');
assert.ok(['length', 'stop'].includes(generated.finishReason), `finishReason: ${generated.finishReason}`);
checkUsage(generated.usage);

const streamed = streamText({ ...request, onError: ({ error }) => { throw error; } });
let streamedText = '';
let chunks = 0;
for await (const delta of streamed.textStream) {
  streamedText += delta;
  chunks += 1;
}
assert.equal(streamedText, generated.text, 'streamed text differs from generateText at temperature 0');
assert.ok(chunks > 1, `expected several streamed deltas, got ${chunks}`);
assert.equal(await streamed.finishReason, generated.finishReason);
checkUsage(await streamed.usage);

await assert.rejects(generateText({ ...request, model: openai.responses('no-such-model') }), (error) => {
  assert.ok(APICallError.isInstance(error), `not an APICallError: ${error}`);
  assert.equal(error.statusCode, 404);
  assert.match(error.message, /no-such-model/);
  return true;
});

console.log(JSON.stringify({
  generated: generated.text, streamed: streamedText, usage: generated.usage,
  responseId: generated.response.id, finishReason: generated.finishReason,
}));
