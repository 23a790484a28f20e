// Conduit through the Vercel AI SDK: `node vercel_ai_sdk.mjs chat` uses the OpenAI-compatible provider
// (chat completions), `node vercel_ai_sdk.mjs responses` the OpenAI provider's `responses()` model (the
// Responses API). Each runs generateText, streamText and an error; exits non-zero on any failed check;
// prints one JSON line (texts, usage, response id, finish reason) for the pytest caller.
import assert from 'node:assert/strict';
import { createOpenAI } from '@ai-sdk/openai';
import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { APICallError, generateText, streamText } from 'ai';

const API = process.argv[2];
assert.ok(['chat', 'responses'].includes(API), `usage: node vercel_ai_sdk.mjs chat|responses (got ${API})`);
const MODEL = process.env.CONDUIT_MODEL ?? 'conduit-demo';
const MAX_TOKENS = 12;
const baseURL = `${process.env.CONDUIT_URL}/v1`;
const model = API === 'chat'
  // includeUsage: stream_options.include_usage, so streamed answers carry usage too
  ? createOpenAICompatible({ name: 'conduit', baseURL, apiKey: 'unused', includeUsage: true })
  : createOpenAI({ baseURL, apiKey: 'unused' }).responses;
const request = {
  model: model(MODEL),
  system: 'Be brief.',
  prompt: 'Hello there',
  maxOutputTokens: MAX_TOKENS,
  temperature: 0,
  maxRetries: 0,
};

// chat: the demo model runs these 12 tokens to the limit, as this check always held; a response may stop
function checkFinish(finishReason) {
  const allowed = API === 'chat' ? ['length'] : ['length', 'stop'];
  assert.ok(allowed.includes(finishReason), `finishReason: ${finishReason}`);
}

function checkUsage(usage) {
  assert.ok(usage.inputTokens > 0, `inputTokens: ${usage.inputTokens}`);
  assert.ok(usage.outputTokens > 0 && usage.outputTokens <= MAX_TOKENS, `outputTokens: ${usage.outputTokens}`);
  if (API === 'chat') assert.equal(usage.outputTokens, MAX_TOKENS);
  assert.equal(usage.totalTokens, usage.inputTokens + usage.outputTokens);
}

const generated = await generateText(request);
assert.ok(generated.text.length > 0, 'generateText returned no text');
checkFinish(generated.finishReason);
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

await assert.rejects(generateText({ ...request, model: model('no-such-model') }), (error) => {
  assert.ok(APICallError.isInstance(error), `not an APICallError: ${error}`);
  assert.equal(error.statusCode, 404);
  assert.match(error.message, /no-such-model/);
  return true;
});

console.log(JSON.stringify({
  generated: generated.text, streamed: streamedText, usage: generated.usage,
  responseId: generated.response.id, finishReason: generated.finishReason,
}));
