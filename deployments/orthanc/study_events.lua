-- prefect-orthanc: post an "orthanc.study.stable" event to Prefect when a study becomes stable.
--
-- Load it with Orthanc's "LuaScripts" option and configure it in the same configuration file:
--
--   "PrefectEvents": {
--     "Url": "http://127.0.0.1:4200/api/events",  // the Prefect API's events endpoint
--     "Server": "research",                         // this Orthanc's name in resource IDs
--     "Authorization": "",                          // optional header value ("Bearer <key>")
--     "Timeout": 5                                  // seconds for the HTTP post
--   }
--
-- The event carries Orthanc IDs and Orthanc's own LastUpdate timestamp, never a DICOM tag value.
-- Its ID is derived from the study ID and LastUpdate exactly as flows/events.py does it, so the
-- changes watcher and this script emit the same ID for the same stable study and Prefect fires
-- a trigger once for both. See docs/events.md for the contract.

local function settings()
  local config = GetOrthancConfiguration()["PrefectEvents"]
  if config == nil or config["Url"] == nil or config["Url"] == "" then
    return nil
  end
  return config
end

-- "20261123T101530" -> "2026-11-23T10:15:30Z" (Orthanc writes LastUpdate in UTC)
local function iso(stamp)
  return string.format("%s-%s-%sT%s:%s:%sZ", stamp:sub(1, 4), stamp:sub(5, 6), stamp:sub(7, 8),
                       stamp:sub(10, 11), stamp:sub(12, 13), stamp:sub(14, 15))
end

-- A UUIDv8 (RFC 9562) from the study ID's hex digits and the LastUpdate digits.
local function event_id(study_id, stamp)
  local hex = study_id:gsub("-", "")
  local digits = stamp:gsub("%D", ""):sub(3, 14)
  local variant = string.format("%x", 8 + tonumber(hex:sub(16, 16), 16) % 4)
  local raw = hex:sub(1, 12) .. "8" .. hex:sub(13, 15) .. variant .. hex:sub(17, 19) .. digits
  return string.format("%s-%s-%s-%s-%s", raw:sub(1, 8), raw:sub(9, 12), raw:sub(13, 16),
                       raw:sub(17, 20), raw:sub(21, 32))
end

-- A study this package retrieved (its "PrefectOrthancSource" metadata names the modality it
-- came from, see tasks/origin.py) is not a new study: it is reported as
-- "orthanc.study.stable.retrieved", which the new-study trigger does not expect. The same rule
-- as flows/events.py's retrieved_by_us; anything unreadable makes an ordinary event.
local function retrieved(studyId)
  local ok, source = pcall(RestApiGet, "/studies/" .. studyId .. "/metadata/PrefectOrthancSource")
  return ok and type(source) == "string" and #source <= 64
    and source:match("^[%w%._%-]+$") ~= nil
end

function OnStableStudy(studyId, tags, metadata)
  local config = settings()
  if config == nil then
    return
  end
  local stamp = metadata and metadata["LastUpdate"]
  if stamp == nil or #stamp < 15 then
    stamp = RestApiGet("/studies/" .. studyId .. "/metadata/LastUpdate")
  end
  local server = config["Server"] or "orthanc"
  local event = {
    id = event_id(studyId, stamp),
    occurred = iso(stamp),
    event = retrieved(studyId) and "orthanc.study.stable.retrieved" or "orthanc.study.stable",
    resource = {
      ["prefect.resource.id"] = "orthanc." .. server .. ".study." .. studyId,
      ["prefect.resource.name"] = "study " .. studyId:sub(1, 8),
      ["orthanc.server"] = server,
      ["orthanc.level"] = "study",
    },
    payload = {
      study_id = studyId,
      server = server,
      last_update = stamp,
      emitter = "lua",
    },
  }
  local headers = { ["Content-Type"] = "application/json" }
  if config["Authorization"] ~= nil and config["Authorization"] ~= "" then
    headers["Authorization"] = config["Authorization"]
  end
  if SetHttpTimeout ~= nil then  -- not in Orthanc 1.10.1 (its HTTP client timeout applies)
    SetHttpTimeout(config["Timeout"] or 5)
  end
  local ok, answer = pcall(HttpPost, config["Url"], DumpJson({ event }, true), headers)
  if not ok or answer == nil then
    print("PrefectEvents: could not post the stable-study event of " .. studyId)
  end
end
