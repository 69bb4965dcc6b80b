#!/usr/bin/env node
// Verifies one agentplane webhook with the Standard Webhooks library for Node
// (`standardwebhooks`), as a receiver written in JavaScript would.
//
//   node verify_webhook.js < request.json
//
// stdin: {"secret": "whsec_...", "headers": {"webhook-id": ..., ...}, "body_base64": ...}
// (the request exactly as received). Prints ONE JSON line: {"verified": true, "type": ...,
// "data": ...} (the payload's), or {"verified": false, "error": ...} with exit status 1.

'use strict';

const { Webhook } = require('standardwebhooks');

let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const request = JSON.parse(input);
  const body = Buffer.from(request.body_base64, 'base64');
  try {
    const payload = new Webhook(request.secret).verify(body, request.headers);
    process.stdout.write(`${JSON.stringify({ verified: true, type: payload.type, data: payload.data })}\n`);
  } catch (err) {
    process.stdout.write(`${JSON.stringify({ verified: false, error: String(err.message || err) })}\n`);
    process.exitCode = 1;
  }
});
