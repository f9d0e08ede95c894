-- wrk script for the benchmark: POSTs a ~300-byte OpenAI-style chat request
-- on every keep-alive connection and, when done, prints one line
-- "WRKJSON {...}" with requests, duration, errors and latency percentiles (µs).
-- The path is the URL's (bench/run.sh: /v1/chat/completions, or /plain).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful assistant that answers briefly."},{"role":"user","content":"Summarise in one sentence why a reverse proxy keeps connections to its targets alive."}],"temperature":0.2,"max_tokens":128,"stream":false,"user":"bench-user-0001"}'

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
