-- Gives every error a REST client gets OpenAI's error body:
--   {"error": {"message": "<what to change>", "type": "...", "code": "<gRPC status name>"}}
-- The OpenAI SDK, LiteLLM and LangChain read `error.message`. Two sources:
--  * the server's errors: the transcoder has mapped grpc-status to the HTTP status and left
--    grpc-status and grpc-message (percent-encoded) in the headers;
--  * Envoy's own replies (an unknown path, malformed JSON, a body over the limit): plain text.
-- Native gRPC calls pass through untouched, and successful REST responses only lose the
-- grpc-* headers that mean nothing to an HTTP client.

local GRPC_STATUS = {
  [1] = {"cancelled", "invalid_request_error"},
  [2] = {"unknown", "server_error"},
  [3] = {"invalid_argument", "invalid_request_error"},
  [4] = {"deadline_exceeded", "timeout_error"},
  [5] = {"not_found", "not_found_error"},
  [7] = {"permission_denied", "permission_error"},
  [8] = {"resource_exhausted", "rate_limit_error"},
  [9] = {"failed_precondition", "invalid_request_error"},
  [13] = {"internal", "server_error"},
  [14] = {"unavailable", "server_error"},
  [16] = {"unauthenticated", "authentication_error"},
}

local HTTP_STATUS = {
  [400] = {"invalid_argument", "invalid_request_error"},
  [404] = {"not_found", "not_found_error"},
  [405] = {"method_not_allowed", "invalid_request_error"},
  [413] = {"request_too_large", "invalid_request_error"},
}

local function percent_decode(text)
  return (text:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

local function json_string(text)
  local escaped = text:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    return string.format("\\u%04x", c:byte())
  end)
  return '"' .. escaped .. '"'
end

local function strip_grpc_headers(headers)
  headers:remove("grpc-status")
  headers:remove("grpc-message")
  headers:remove("grpc-status-details-bin")
  headers:remove("grpc-accept-encoding")
end

function envoy_on_request(handle)
  local content_type = handle:headers():get("content-type") or ""
  handle:streamInfo():dynamicMetadata():set("embedserve", "rest", content_type:find("^application/grpc") == nil)
end

function envoy_on_response(handle)
  local metadata = handle:streamInfo():dynamicMetadata():get("embedserve")
  if metadata == nil or not metadata["rest"] then
    return
  end
  local http_status = tonumber(handle:headers():get(":status")) or 500
  local grpc_status = tonumber(handle:headers():get("grpc-status") or "")
  local status, message
  if grpc_status ~= nil and grpc_status ~= 0 then
    status = GRPC_STATUS[grpc_status] or {"unknown", "server_error"}
    message = percent_decode(handle:headers():get("grpc-message") or "")
    if grpc_status == 8 and message:find("larger than max", 1, true) then
      -- gRPC's own limit on message size (the server's MAX_MESSAGE_BYTES), not an overload:
      -- a 429 would tell clients to retry the same request.
      status = HTTP_STATUS[413]
      handle:headers():replace(":status", "413")
      message = "the request is larger than the server accepts (its MAX_MESSAGE_BYTES): send fewer or "
        .. "shorter inputs per request (" .. message .. ")"
    end
  elseif http_status >= 400 then
    status = HTTP_STATUS[http_status] or {"unavailable", "server_error"}
    -- Reading the body waits for it; header objects taken before that are no longer valid.
    local body = handle:body(true)
    message = body:getBytes(0, body:length()):gsub("%s+$", "")
  else
    strip_grpc_headers(handle:headers())
    return
  end
  local headers = handle:headers()
  strip_grpc_headers(headers)
  headers:replace("content-type", "application/json")
  handle:body(true):setBytes('{"error":{"message":' .. json_string(message) .. ',"type":"' .. status[2]
    .. '","code":"' .. status[1] .. '"}}')
end
