-- Gives every error a REST client gets OpenAI's error body:
--   {"error": {"message": "<what to change>", "type": "...", "code": "<gRPC status name>"}}
-- The OpenAI SDK, LiteLLM and LangChain read `error.message`. Two sources:
--  * the server's errors: the transcoder has mapped grpc-status to the HTTP status and left
--    grpc-status and grpc-message (percent-encoded) in the headers;
--  * Envoy's own replies (an unknown path, malformed JSON, a body over the limit): plain text.
-- Native gRPC calls (a gRPC content type to a method path, /<package>.<Service>/<Method>) pass
-- through untouched, and successful REST responses only lose the grpc-* headers that mean nothing
-- to an HTTP client and get the server's gRPC trailers (timing, idempotency) as headers. Every
-- other request is REST, whatever its content type: one that claims to be gRPC anyway (gRPC-Web,
-- for which there is no filter, or gRPC to a REST path) is answered 415 here, before the
-- transcoder would pass it on as gRPC and return gRPC's reply; and one whose list of strings has
-- a null or a list in it is answered 400 (reshaped_list), before the transcoder would drop or
-- flatten it. Bodies are valid UTF-8 JSON even when Envoy's message quotes request bytes that
-- are not UTF-8. An overload's `retry-after` trailer (a header of the server's trailers-only
-- reply) is left on the 429, where HTTP clients (the OpenAI SDK among them) read it as
-- Retry-After.

local GRPC_STATUS = {
  [1] = {"cancelled", "invalid_request_error"},
  [2] = {"unknown", "server_error"},
  [3] = {"invalid_argument", "invalid_request_error"},
  [4] = {"deadline_exceeded", "timeout_error"},
  [5] = {"not_found", "not_found_error"},
  [7] = {"permission_denied", "permission_error"},
  [8] = {"resource_exhausted", "rate_limit_error"},
  [9] = {"failed_precondition", "invalid_request_error"},
  [10] = {"aborted", "conflict_error"},  -- 409: a duplicate of an idempotent request still running
  [13] = {"internal", "server_error"},
  [14] = {"unavailable", "server_error"},
  [16] = {"unauthenticated", "authentication_error"},
}

local HTTP_STATUS = {
  [400] = {"invalid_argument", "invalid_request_error"},
  [404] = {"not_found", "not_found_error"},
  [405] = {"method_not_allowed", "invalid_request_error"},
  [413] = {"request_too_large", "invalid_request_error"},
  [415] = {"unsupported_media_type", "invalid_request_error"},
}

-- Where a REST client is told to send native gRPC instead.
local GRPC_EXAMPLE = "/embedserve.v1.EmbeddingService/Embed"
local REPLACEMENT_CHARACTER = "\239\191\189"  -- U+FFFD in UTF-8

local function percent_decode(text)
  return (text:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- The length of the well-formed UTF-8 sequence (RFC 3629: no overlong forms, no surrogates)
-- that starts at byte `i` of `text`, or nil.
local function utf8_length(text, i)
  local first = text:byte(i)
  local continuations, low, high -- how many bytes follow, and the range of the first of them
  if first >= 0xC2 and first <= 0xDF then continuations, low, high = 1, 0x80, 0xBF
  elseif first == 0xE0 then continuations, low, high = 2, 0xA0, 0xBF
  elseif first == 0xED then continuations, low, high = 2, 0x80, 0x9F
  elseif first >= 0xE1 and first <= 0xEF then continuations, low, high = 2, 0x80, 0xBF
  elseif first == 0xF0 then continuations, low, high = 3, 0x90, 0xBF
  elseif first >= 0xF1 and first <= 0xF3 then continuations, low, high = 3, 0x80, 0xBF
  elseif first == 0xF4 then continuations, low, high = 3, 0x80, 0x8F
  else return nil end
  for k = 1, continuations do
    local byte = text:byte(i + k)
    if byte == nil or byte < low or byte > high then return nil end
    low, high = 0x80, 0xBF
  end
  return continuations + 1
end

-- `text` as a JSON string: quotes, backslashes and control characters escaped, well-formed
-- multi-byte UTF-8 kept, and each other byte (Envoy quotes a body that is not UTF-8 as it came)
-- replaced by U+FFFD, so that the body is always valid JSON (RFC 8259 wants UTF-8).
local function json_string(text)
  local parts, i = {}, 1
  while true do
    local j = text:find('[%z\1-\31"\\\127-\255]', i)
    if j == nil then
      parts[#parts + 1] = text:sub(i)
      break
    end
    parts[#parts + 1] = text:sub(i, j - 1)
    local byte = text:byte(j)
    local length = byte >= 0x80 and utf8_length(text, j) or nil
    if length ~= nil then
      parts[#parts + 1] = text:sub(j, j + length - 1)
      i = j + length
    else
      if byte == 0x22 then parts[#parts + 1] = '\\"'
      elseif byte == 0x5C then parts[#parts + 1] = "\\\\"
      elseif byte < 0x80 then parts[#parts + 1] = string.format("\\u%04x", byte)
      else parts[#parts + 1] = REPLACEMENT_CHARACTER end
      i = j + 1
    end
  end
  return '"' .. table.concat(parts) .. '"'
end

-- OpenAI's error body; `status` is a row of GRPC_STATUS or HTTP_STATUS.
local function error_body(message, status)
  return '{"error":{"message":' .. json_string(message) .. ',"type":"' .. status[2] .. '","code":"'
    .. status[1] .. '"}}'
end

local function strip_grpc_headers(headers)
  headers:remove("grpc-status")
  headers:remove("grpc-message")
  headers:remove("grpc-status-details-bin")
  headers:remove("grpc-accept-encoding")
  headers:remove("embedserve-http-status")
end

-- A native gRPC call: one of gRPC's content types (application/grpc, application/grpc+proto, ...;
-- not gRPC-Web's) to a method path, /<package>.<Service>/<Method>.
local function native_grpc(content_type, path)
  return (content_type == "application/grpc" or content_type:find("^application/grpc[+;]") ~= nil)
    and path:find("^/[%a_][%w_]*%.[%w_.]*/[%a_][%w_]*$") ~= nil
end

-- What a request with a gRPC-looking content type that is not a native gRPC call is told.
local function unsupported(content_type, path)
  local shown = content_type:sub(1, 100)
  if content_type:find("^application/grpc%-web") then
    return "gRPC-Web (content-type " .. shown .. ") is not supported: send REST requests as application/json, "
      .. "or native gRPC (application/grpc, over HTTP/2) to the gRPC method paths, such as " .. GRPC_EXAMPLE
  end
  return "content-type " .. shown .. " is for native gRPC calls to the gRPC method paths, such as "
    .. GRPC_EXAMPLE .. ", not " .. path:sub(1, 200) .. ": send REST requests as application/json"
end

-- A REST body is JSON: application/json or a +json type, parameters (charset) aside. No content
-- type at all is read as JSON too, as curl and some clients send none.
local function json_content_type(content_type)
  local media = content_type:gsub(";.*", ""):gsub("%s+", "")
  return media == "" or media == "application/json" or media:find("^application/[%w.-]+%+json$") ~= nil
end

-- Why a REST request to a known route is refused before it is transcoded, if it is: its status
-- (405, a method the route does not take; 415, a body that is not JSON), message and, for a 405,
-- the Allow header. ROUTES (the path patterns of proto/'s HTTP rules and their methods) is written
-- above this file by envoy/gateway.py. An unknown path is left to the transcoder's 404.
local function refusal(method, path, content_type)
  local bare = path:gsub("[?#].*", "")
  local allowed = nil
  for pattern, methods in pairs(ROUTES) do
    if bare:find(pattern) then
      allowed = allowed and (allowed .. ", " .. methods) or methods
    end
  end
  if allowed == nil then
    return nil
  end
  if not (", " .. allowed .. ","):find(", " .. method .. ",", 1, true) then
    return "405", method:sub(1, 20) .. " is not allowed on " .. bare:sub(1, 200) .. ": it takes " .. allowed, allowed
  end
  if method ~= "GET" and not json_content_type(content_type) then
    return "415", "content-type " .. content_type:sub(1, 100) .. " is not supported: send the body as JSON, "
      .. "with content-type application/json"
  end
  return nil
end

-- Removes the request headers that gRPC metadata cannot carry or that gRPC reads itself: a name
-- outside gRPC's [0-9a-z_.-] (HTTP allows !#$%&'*+^`|~ too), a binary one (-bin, which gRPC
-- decodes as base64) and gRPC's own (grpc-*, such as grpc-timeout). The server answers the first
-- kind, and a malformed one of the others, INTERNAL (a 500); to a REST route they are headers it
-- does not know, which HTTP has it ignore.
local function drop_non_metadata(headers)
  local dropped = {}
  for name, _ in pairs(headers) do
    if name:sub(1, 1) ~= ":" and (name:find("^[%w_.-]+$") == nil or name:find("%-bin$") or name:find("^grpc%-")) then
      dropped[#dropped + 1] = name
    end
  end
  for _, name in ipairs(dropped) do
    headers:remove(name)
  end
end

-- The name of a JSON object key as the transcoder reads it: the raw text between its quotes, with
-- the \u00XX escapes of ASCII decoded (a field name is ASCII, so no other escape can make one).
local function key_name(raw)
  if raw:find("\\", 1, true) == nil then
    return raw
  end
  return (raw:gsub("\\u00([0-7]%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- The end of the JSON string whose opening quote is at byte `i` of `body` (the index of its
-- closing quote), or nil if it has none. An escape skips the byte after its backslash.
local function string_end(body, i)
  local k = i + 1
  while true do
    local j = body:find('["\\]', k)
    if j == nil or body:byte(j) == 0x22 then
      return j
    end
    k = j + 2
  end
end

-- Why a REST body is refused before it is transcoded, if it is: a list of one of `fields` (the
-- route's LIST_FIELDS: repeated scalar fields, by name, and what each item must be) with a null
-- item or a list item. The transcoder would drop the null and flatten the list, and the server
-- would answer for a list other than the client's (result index 1 for another document), so
-- such a body is a 400 naming the item. One linear pass over the body that skips strings whole:
-- it only tracks nesting, the key of each top-level field and the index of each item of a
-- checked list. A body that is not well-formed JSON is left to the transcoder, which refuses it.
-- Not refused: a single value for such a field, which the transcoder reads as a list of it, as
-- OpenAI-compatible APIs read a string for a list; and lists in nested messages (the request
-- messages of proto/ have none with repeated scalar fields).
local function reshaped_list(body, fields)
  local depth, top_is_object = 0, false
  local key, expect_key = nil, false -- the last key of the top-level object; whether one comes next
  local kind, index = nil, 0 -- what the items of the checked list at depth 2 must be; the item's index
  local i = 1
  while true do
    local j = body:find('[%[%]{},"n]', i)
    if j == nil then
      return nil
    end
    local byte = body:byte(j)
    i = j + 1
    if byte == 0x22 then -- "
      local close = string_end(body, j)
      if close == nil then
        return nil
      end
      if depth == 1 and expect_key then
        key, expect_key = key_name(body:sub(j + 1, close - 1)), false
      end
      i = close + 1
    elseif byte == 0x6E then -- n: outside a string, only `null` has one
      if kind ~= nil and depth == 2 and body:sub(j, j + 3) == "null" then
        return key .. "[" .. index .. "] is null: every item of " .. key .. " must be " .. kind
          .. "; remove the null or send " .. kind .. " in its place"
      end
    elseif byte == 0x2C then -- ,
      if depth == 1 then
        expect_key = top_is_object
      elseif depth == 2 and kind ~= nil then
        index = index + 1
      end
    elseif byte == 0x5B or byte == 0x7B then -- [ {
      if kind ~= nil and depth == 2 and byte == 0x5B then
        return key .. "[" .. index .. "] is a list: every item of " .. key .. " must be " .. kind
          .. ", not a list; send one flat list"
      end
      depth = depth + 1
      if depth == 1 then
        top_is_object, expect_key = byte == 0x7B, byte == 0x7B
      elseif depth == 2 and byte == 0x5B and top_is_object and key ~= nil then
        kind, index = fields[key], 0
      end
    else -- ] }
      depth = depth - 1
      if depth < 2 then
        kind = nil
      end
    end
  end
end

-- The LIST_FIELDS row of a request's path (LIST_FIELDS is written above this file by
-- envoy/gateway.py, as ROUTES is), or nil.
local function list_fields(path)
  local bare = path:gsub("[?#].*", "")
  for pattern, fields in pairs(LIST_FIELDS) do
    if bare:find(pattern) then
      return fields
    end
  end
  return nil
end

function envoy_on_request(handle)
  local headers = handle:headers()
  local content_type = (headers:get("content-type") or ""):lower()
  local path = headers:get(":path") or ""
  local metadata = handle:streamInfo():dynamicMetadata()
  local native = native_grpc(content_type, path)
  metadata:set("embedserve", "rest", not native)
  -- A reply to HEAD has no body (RFC 9110 9.3.2): one written anyway is read by an HTTP/1.1
  -- client as the start of the next response on the connection.
  metadata:set("embedserve", "head", headers:get(":method") == "HEAD")
  if not native and content_type:find("^application/grpc") then
    -- The transcoder would pass it on as gRPC (a JSON body got an empty 200). Envoy sends this
    -- local reply as gRPC too (a 200 with grpc-status, no body), as it does every reply to a
    -- gRPC content type, so envoy_on_response writes the 415 from the message left here.
    metadata:set("embedserve", "unsupported", unsupported(content_type, path))
    handle:respond({[":status"] = "415"}, "")
  elseif not native then
    -- A plain local reply: envoy_on_response writes its message into OpenAI's error body.
    local status, message, allow = refusal(headers:get(":method") or "", path, content_type)
    if status ~= nil then
      handle:respond({[":status"] = status, ["allow"] = allow}, message)
      return
    end
    drop_non_metadata(headers)
    local fields = list_fields(path)
    if fields ~= nil then
      -- Reading the body waits for all of it (route request_body_buffer_limit in envoy.yaml);
      -- header objects taken before that are no longer valid.
      local body = handle:body()
      message = body ~= nil and reshaped_list(body:getBytes(0, body:length()), fields) or nil
      if message ~= nil then
        handle:respond({[":status"] = "400"}, message)
      end
    end
  end
end

function envoy_on_response(handle)
  local metadata = handle:streamInfo():dynamicMetadata():get("embedserve")
  if metadata == nil or not metadata["rest"] then
    return
  end
  local http_status = tonumber(handle:headers():get(":status")) or 500
  local grpc_status = tonumber(handle:headers():get("grpc-status") or "")
  local status, message
  if metadata["unsupported"] ~= nil then -- envoy_on_request's refusal
    status, message = HTTP_STATUS[415], metadata["unsupported"]
    handle:headers():replace(":status", "415")
  elseif grpc_status ~= nil and grpc_status ~= 0 then
    status = GRPC_STATUS[grpc_status] or {"unknown", "server_error"}
    local grpc_message = handle:headers():get("grpc-message")
    if grpc_message ~= nil then
      message = percent_decode(grpc_message)
    else
      -- Envoy's own reply with a grpc-status (the circuit breakers', envoy.yaml's local reply
      -- mapper) has its message in the body. Reading the body waits for it; header objects
      -- taken before that are no longer valid.
      local body = handle:body(true)
      message = body ~= nil and body:getBytes(0, body:length()):gsub("%s+$", "") or ""
    end
    if grpc_status == 8 and message:find("larger than max", 1, true) then
      -- gRPC's own limit on message size (the server's MAX_MESSAGE_BYTES), not an overload:
      -- a 429 would tell clients to retry the same request.
      status = HTTP_STATUS[413]
      handle:headers():replace(":status", "413")
      message = "the request is larger than the server accepts (its MAX_MESSAGE_BYTES): send fewer or "
        .. "shorter inputs per request (" .. message .. ")"
    end
    -- The server's own HTTP status for an error that grpc-status maps too coarsely (422 for an
    -- idempotency key reused with another body): it wins; strip_grpc_headers removes it.
    local exact = tonumber(handle:headers():get("embedserve-http-status") or "")
    if exact ~= nil and exact >= 400 and exact <= 599 then
      handle:headers():replace(":status", string.format("%d", exact))
    end
  elseif http_status >= 400 then
    status = HTTP_STATUS[http_status] or {"unavailable", "server_error"}
    -- Reading the body waits for it; header objects taken before that are no longer valid.
    local body = handle:body(true)
    message = body:getBytes(0, body:length()):gsub("%s+$", "")
  else
    if grpc_status == 0 then
      -- A transcoded answer: the server sends its headers (timing, idempotency) as gRPC
      -- trailers, with the answer (server/embedserve/headers.py says why); an HTTP client gets
      -- them as headers, which the transcoder has held until the trailers came. The body is
      -- read first (it ends where the trailers come) so that the headers wait with it; waiting
      -- for the trailers alone would pass the body, and with it the headers, on. Header objects
      -- taken before that are no longer valid.
      handle:body()
      local trailers = handle:trailers()
      if trailers ~= nil then
        local headers = handle:headers()
        for key, value in pairs(trailers) do
          if key:sub(1, 5) ~= "grpc-" then
            headers:replace(key, value)
          end
        end
      end
    end
    strip_grpc_headers(handle:headers())
    return
  end
  local headers = handle:headers()
  strip_grpc_headers(headers)
  headers:replace("content-type", "application/json")
  if not metadata["head"] then
    handle:body(true):setBytes(error_body(message, status))
  end
end
