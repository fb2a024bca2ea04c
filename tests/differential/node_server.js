// A tracking API on Node's http server, read the way an Express 4 app reads a request:
// body-parser's json() (JSON.parse, the last of duplicate keys wins) and urlencoded({extended:
// true}) (the qs package, so `a[b]=c` is nested and `a[]=c` is an array), each taking the body
// only when type-is matches its Content-Type; the query by qs.parse with Express 4's options.
// Headers as Node joins them: repeated values with ", ".
//
// Usage: node node_server.js ROUTES_JSON   (prints its port, then serves)
"use strict";

const http = require("http");
const bodyParser = require("body-parser");
const qs = require("qs");

const routes = JSON.parse(process.argv[2] || "{}");
const records = [];
const parseJson = bodyParser.json();
const parseForm = bodyParser.urlencoded({ extended: true });

function routeFor(path) {
  return Object.values(routes).find((route) => path.endsWith(route.suffix)) || {};
}

function own(node, key) {
  return node !== null && typeof node === "object" && Object.prototype.hasOwnProperty.call(node, key);
}

function walk(document, path) {
  let current = [document];
  for (const piece of path.split(".")) {
    const star = piece.endsWith("[*]");
    const key = star ? piece.slice(0, -3) : piece;
    const following = [];
    for (const node of current) {
      if (!own(node, key)) continue;
      const value = node[key];
      if (!star) following.push(value);
      else if (Array.isArray(value)) following.push(...value);
    }
    current = following;
  }
  return current.filter((value) => value !== null && value !== undefined);
}

function send(res, payload) {
  const body = Buffer.from(payload);
  res.writeHead(200, { "Content-Type": "application/json", "Content-Length": body.length });
  res.end(body);
}

function answer(req, res, error) {
  const [path, ...rest] = req.url.split("?");
  const query = qs.parse(rest.join("?"), { allowPrototypes: true });
  const route = routeFor(path);
  const readings = {};
  for (const jsonPath of route.json || []) {
    readings[`json ${jsonPath}`] = error ? [] : walk(req.body, jsonPath);
  }
  for (const name of route.query || []) {
    readings[`query ${name}`] = own(query, name) ? [query[name]] : [];
  }
  for (const name of route.header || []) {
    const value = req.headers[name.toLowerCase()];
    readings[`header ${name}`] = value === undefined ? [] : [value];
  }
  records.push({
    request_id: req.headers["x-request-id"] ?? null,
    method: req.method,
    path,
    auth_status: req.headers["x-auth-status"] ?? null,
    authenticated_user: req.headers["x-authenticated-user"] ?? null,
    readings,
    note: error ? `body-parser: ${error.message}` : null,
  });
  send(res, '{"success":true}');
}

const server = http.createServer((req, res) => {
  if (req.url === "/__records") {
    send(res, JSON.stringify(records));
    return;
  }
  parseJson(req, res, (jsonError) => {
    if (jsonError) {
      answer(req, res, jsonError);
      return;
    }
    parseForm(req, res, (formError) => answer(req, res, formError));
  });
});

server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`${server.address().port}\n`);
});
