#!/usr/bin/env node
// Runs one agentplane session from Node.js, using nothing but the .proto files:
// @grpc/proto-loader loads protos/agentplane/v1/{session,budget}.proto and the standard
// grpc.health.v1 health.proto (a copy beside this script); @grpc/grpc-js makes the calls.
//
//   node run_session.js --prompt "Say hi" [--target TARGET] [--token TOKEN]
//                       [--model M] [--budget USD] [--timeout SECONDS] [--protos DIR]
//                       [--sessions N] [--health-service NAME]
//                       [--caller-tool JSON]... [--tool-result TEXT]
//                       [--require-approval PATTERN]... [--permission allow|deny]
//                       [--output-schema JSON] [--input-file REMOTE=LOCAL]...
//                       [--download PATH]...
//                       [--on-budget-exhausted END|PAUSE [--raise-to USD]]
//                       [--ca-file PEM [--cert-file PEM --key-file PEM]]
//   node run_session.js --print-service-config
//
// --target defaults to $AGENTPLANE_TARGET or 127.0.0.1:50051, --token to $AGENTPLANE_TOKEN;
// several replicas: ipv4:HOST:PORT,HOST:PORT or dns:///NAME:PORT (see SERVICE_CONFIG).
// --ca-file: connect with TLS, trusting that CA; --cert-file/--key-file: a client
// certificate (mTLS). Without them the channel is plaintext.
// Checks Health/Check of --health-service (default "") == SERVING, reads the caller's
// budget, runs --sessions sessions (default 1) one after the other, each to its `result`
// event, and prints ONE JSON line (the fields of the last session, and all of them):
//   {"health":"SERVING","tenant":...,"session_id":...,"kinds":["started",...,"result"],
//    "seqs":[1,2,...],"state":"SESSION_STATE_COMPLETE","cost_usd":"0.0123",...,
//    "sessions":[{"session_id":...,"state":...}]}
// Callers in the loop: --caller-tool declares a caller tool (a CallerTool as JSON:
// {"name":..., "description":..., "input_schema_json":...}); each of its calls (an
// `input_request` of kind TOOL_CALL) is answered with Respond: --tool-result TEXT, with the
// call's input appended as JSON. --require-approval names tools that need approval; each
// request of kind PERMISSION is answered --permission allow or deny (unset: unanswered).
// The summary then has "inputs" (each input_request: request_id, kind, tool_name, input),
// "resolved" (each input_resolved) and "responded" (what each Respond recorded).
// Files and results: --output-schema sends a JSON Schema (the summary's
// "structured_result" is the session's, parsed; null without one); --input-file puts the
// local file LOCAL into the workspace as REMOTE. With --download, the last session's
// artifacts are listed ("artifacts": ListArtifacts) and each PATH is fetched with
// GetArtifact ("downloads": {PATH: {"artifact": the first chunk's, "offsets": [...],
// "base64": the bytes, "sha256": their hex digest}}).
// Budgets: --on-budget-exhausted PAUSE makes a session pause at its budget (a `paused`
// event) instead of ending; with --raise-to, each pause is answered with
// UpdateSessionBudget to that budget, and the summary has "pauses" (each event's
// BudgetPause) and "raised" (the max_budget_usd of each reply).
// Exit status: 0 every session ended COMPLETE; 1 one ended otherwise; 2 the server is not
// SERVING; 3 a call failed (the summary's "error" has the gRPC code and details); 64 usage.

'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};

// agentplane's service config (docs/operations.md, "Clients of several replicas"; the Python client's
// agentplane.service_config()): round_robin over every address of the target, and
// UNAVAILABLE retried, which a draining replica answers new sessions with before anything
// starts. grpc-js (1.14) ignores healthCheckConfig (no client-side health checking), so
// here the retries alone steer calls off a draining replica; C-core, Go and Java also
// stop sending to it.
const SERVICE_CONFIG = {
  loadBalancingConfig: [{ round_robin: {} }],
  healthCheckConfig: { serviceName: 'readiness' },
  methodConfig: [
    {
      name: [
        { service: 'agentplane.v1.SessionService' },
        { service: 'agentplane.v1.BudgetService' },
        { service: 'agentplane.v1.UsageService' },
        { service: 'grpc.health.v1.Health', method: 'Check' },
      ],
      retryPolicy: {
        maxAttempts: 5,
        initialBackoff: '0.1s',
        maxBackoff: '1s',
        backoffMultiplier: 2,
        retryableStatusCodes: ['UNAVAILABLE'],
      },
    },
  ],
  retryThrottling: { maxTokens: 100, tokenRatio: 1 },
};
const CHANNEL_OPTIONS = {
  'grpc.service_config': JSON.stringify(SERVICE_CONFIG),
  'grpc.enable_retries': 1,
};

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

function usage(message) {
  process.stderr.write(`run_session: ${message}\n`);
  process.exit(64);
}

function options() {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        prompt: { type: 'string' },
        target: { type: 'string', default: process.env.AGENTPLANE_TARGET || '127.0.0.1:50051' },
        token: { type: 'string', default: process.env.AGENTPLANE_TOKEN || '' },
        model: { type: 'string', default: '' },
        budget: { type: 'string', default: '' },
        timeout: { type: 'string', default: '120' },
        protos: { type: 'string', default: path.resolve(__dirname, '..', '..', 'protos') },
        sessions: { type: 'string', default: '1' },
        'health-service': { type: 'string', default: '' },
        'caller-tool': { type: 'string', multiple: true, default: [] },
        'tool-result': { type: 'string' },
        'require-approval': { type: 'string', multiple: true, default: [] },
        permission: { type: 'string' },
        'output-schema': { type: 'string', default: '' },
        'input-file': { type: 'string', multiple: true, default: [] },
        download: { type: 'string', multiple: true, default: [] },
        'on-budget-exhausted': { type: 'string', default: '' },
        'raise-to': { type: 'string' },
        'ca-file': { type: 'string' },
        'cert-file': { type: 'string' },
        'key-file': { type: 'string' },
        'print-service-config': { type: 'boolean', default: false },
      },
      allowPositionals: true,
    });
  } catch (err) {
    usage(err.message);
  }
  const opts = parsed.values;
  if (opts['print-service-config']) return opts;
  opts.prompt = opts.prompt ?? parsed.positionals.join(' ');
  if (!opts.prompt) usage('a prompt is required (--prompt TEXT)');
  opts.timeout = Number(opts.timeout);
  if (!(opts.timeout > 0)) usage('--timeout must be a positive number of seconds');
  try {
    opts.callerTools = opts['caller-tool'].map((text) => JSON.parse(text));
  } catch (err) {
    usage(`--caller-tool must be a CallerTool as JSON: ${err.message}`);
  }
  if (opts.permission !== undefined && !['allow', 'deny'].includes(opts.permission)) {
    usage('--permission must be allow or deny');
  }
  opts.inputFiles = opts['input-file'].map((spec) => {
    const at = spec.indexOf('=');
    if (at <= 0) usage(`--input-file must be REMOTE=LOCAL, not ${spec}`);
    return { path: spec.slice(0, at), content: fs.readFileSync(spec.slice(at + 1)) };
  });
  if ((opts['cert-file'] === undefined) !== (opts['key-file'] === undefined)) {
    usage('--cert-file and --key-file go together');
  }
  if (opts['cert-file'] !== undefined && opts['ca-file'] === undefined) {
    usage('a client certificate needs TLS: give --ca-file too');
  }
  opts.sessions = Number(opts.sessions);
  if (!(Number.isInteger(opts.sessions) && opts.sessions > 0)) {
    usage('--sessions must be a positive integer');
  }
  return opts;
}

function load(protosDir) {
  const definition = protoLoader.loadSync(
    ['agentplane/v1/session.proto', 'agentplane/v1/budget.proto', 'health.proto'],
    { ...LOADER_OPTIONS, includeDirs: [protosDir, __dirname] },
  );
  return grpc.loadPackageDefinition(definition);
}

// Plaintext, or TLS trusting --ca-file (with --cert-file/--key-file: mTLS).
function channelCredentials(opts) {
  if (opts['ca-file'] === undefined) return grpc.credentials.createInsecure();
  const read = (name) => (opts[name] === undefined ? null : fs.readFileSync(opts[name]));
  return grpc.credentials.createSsl(read('ca-file'), read('key-file'), read('cert-file'));
}

function deadline(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function unary(client, method, request, metadata, seconds) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline(seconds) }, (err, reply) =>
      err ? reject(err) : resolve(reply),
    );
  });
}

// Reads a server stream until it ends; calls onEvent for each message.
function readStream(call, onEvent) {
  return new Promise((resolve, reject) => {
    let settled = false;
    call.on('data', onEvent);
    call.on('error', (err) => {
      if (!settled) { settled = true; reject(err); }
    });
    call.on('end', () => {
      if (!settled) { settled = true; resolve(); }
    });
  });
}

// The answer (a RespondRequest's oneof) to an input request, or null to leave it.
function answerFor(request, opts) {
  if (request.kind === 'INPUT_KIND_TOOL_CALL' && opts['tool-result'] !== undefined) {
    return { tool_result: { text: `${opts['tool-result']} ${request.input_json}` } };
  }
  if (request.kind === 'INPUT_KIND_PERMISSION' && opts.permission !== undefined) {
    const allow = opts.permission === 'allow';
    return { permission: { allow, message: allow ? '' : 'denied by the Node caller' } };
  }
  return null;
}

// Runs one session to its end; its fields go into `summary`. Returns its final Session
// (null: the stream ended without a result event). Answers input requests (answerFor) with
// Respond while the stream goes on.
async function runSession(sessions, request, metadata, opts, summary) {
  Object.assign(summary, {
    session_id: null, kinds: [], seqs: [], state: null, inputs: [], resolved: [], responded: [],
    pauses: [], raised: [],
  });
  const call = sessions.RunSession(request, metadata, { deadline: deadline(opts.timeout) });
  let final = null;
  const answers = [];
  const failures = [];
  await readStream(call, (event) => {
    summary.session_id = summary.session_id ?? event.session_id;
    summary.kinds.push(event.kind);
    summary.seqs.push(Number(event.seq));
    if (event.kind === 'result') final = event.result.session;
    if (event.kind === 'paused') {
      summary.pauses.push(event.paused.pause);
      if (opts['raise-to'] !== undefined) {
        const raise = { session_id: event.session_id, max_budget_usd: opts['raise-to'] };
        answers.push(unary(sessions, 'UpdateSessionBudget', raise, metadata, 30).then(
          (reply) => { summary.raised.push(reply.max_budget_usd); },
          (err) => { failures.push(err); },
        ));
      }
    }
    if (event.kind === 'input_resolved') summary.resolved.push(event.input_resolved);
    if (event.kind === 'input_request') {
      const asked = event.input_request;
      summary.inputs.push({
        request_id: asked.request_id, kind: asked.kind, tool_name: asked.tool_name,
        input: JSON.parse(asked.input_json || '{}'),
      });
      const answer = answerFor(asked, opts);
      if (answer !== null) {
        const respond = { session_id: event.session_id, request_id: asked.request_id, ...answer };
        answers.push(unary(sessions, 'Respond', respond, metadata, 30).then(
          (reply) => { summary.responded.push(reply.resolved); },
          (err) => { failures.push(err); },
        ));
      }
    }
  });
  await Promise.all(answers);
  if (failures.length > 0) throw failures[0];
  if (final === null) return null;
  Object.assign(summary, {
    state: final.state,
    cost_usd: final.cost_usd,
    num_turns: final.num_turns,
    input_tokens: Number(final.usage.input_tokens),
    output_tokens: Number(final.usage.output_tokens),
    result: final.result,
    error_reason: final.error ? final.error.reason : null,
    structured_result: final.structured_result_json ? JSON.parse(final.structured_result_json) : null,
  });
  return final;
}

// Lists a session's artifacts and downloads each of `paths` (GetArtifact, in chunks).
async function fetchArtifacts(sessions, sessionId, paths, metadata, summary) {
  const listed = await unary(sessions, 'ListArtifacts', { session_id: sessionId }, metadata, 30);
  summary.artifacts = listed.artifacts.map((a) => ({ ...a, size_bytes: Number(a.size_bytes) }));
  summary.downloads = {};
  for (const artifactPath of paths) {
    const call = sessions.GetArtifact(
      { session_id: sessionId, path: artifactPath }, metadata, { deadline: deadline(30) },
    );
    const chunks = [];
    await readStream(call, (chunk) => chunks.push(chunk));
    const data = Buffer.concat(chunks.map((c) => c.data));
    summary.downloads[artifactPath] = {
      artifact: chunks.length && chunks[0].artifact
        ? { ...chunks[0].artifact, size_bytes: Number(chunks[0].artifact.size_bytes) } : null,
      offsets: chunks.map((c) => Number(c.offset)),
      base64: data.toString('base64'),
      sha256: crypto.createHash('sha256').update(data).digest('hex'),
    };
  }
}

async function main() {
  const opts = options();
  if (opts['print-service-config']) return SERVICE_CONFIG;
  const pkg = load(opts.protos);
  const credentials = channelCredentials(opts);
  const metadata = new grpc.Metadata();
  if (opts.token) metadata.add('authorization', `Bearer ${opts.token}`);

  const health = new pkg.grpc.health.v1.Health(opts.target, credentials, CHANNEL_OPTIONS);
  const budgets = new pkg.agentplane.v1.BudgetService(opts.target, credentials, CHANNEL_OPTIONS);
  const sessions = new pkg.agentplane.v1.SessionService(opts.target, credentials, CHANNEL_OPTIONS);
  const summary = {
    health: null, tenant: null, session_id: null, kinds: [], seqs: [], state: null, sessions: [],
  };
  let exitCode = 0;
  try {
    const service = opts['health-service'];
    const status = await unary(health, 'Check', { service }, new grpc.Metadata(), 10);
    summary.health = status.status;
    if (status.status !== 'SERVING') {
      exitCode = 2;
      return summary;
    }
    const budget = await unary(budgets, 'GetBudget', {}, metadata, 10);
    summary.tenant = budget.tenant;
    summary.remaining_usd_before = budget.remaining_usd;

    const request = {
      prompt: opts.prompt, model: opts.model, max_budget_usd: opts.budget,
      tools: opts.callerTools, require_approval: opts['require-approval'],
      output_schema_json: opts['output-schema'], input_files: opts.inputFiles,
      on_budget_exhausted: opts['on-budget-exhausted']
        ? `ON_BUDGET_EXHAUSTED_${opts['on-budget-exhausted'].toUpperCase()}` : 'ON_BUDGET_EXHAUSTED_UNSPECIFIED',
    };
    for (let i = 0; i < opts.sessions; i += 1) {
      const final = await runSession(sessions, request, metadata, opts, summary);
      if (final === null) {
        summary.error = { code: 'NO_RESULT', details: 'the stream ended without a result event' };
        exitCode = 1;
        return summary;
      }
      summary.sessions.push({ session_id: final.id, state: final.state });
      if (final.state !== 'SESSION_STATE_COMPLETE') exitCode = 1;
    }
    if (opts.download.length > 0) {
      await fetchArtifacts(sessions, summary.session_id, opts.download, metadata, summary);
    }
    return summary;
  } catch (err) {
    summary.error = { code: CODE_NAMES[err.code] ?? String(err.code), details: err.details ?? err.message };
    exitCode = 3;
    return summary;
  } finally {
    for (const client of [health, budgets, sessions]) client.close();
    process.exitCode = exitCode;
  }
}

main().then(
  (summary) => process.stdout.write(`${JSON.stringify(summary)}\n`),
  (err) => {
    process.stderr.write(`run_session: ${err && err.stack ? err.stack : err}\n`);
    process.exitCode = 70;
  },
);
