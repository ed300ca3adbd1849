-- Argo CD health check for saber.dev/SaberService, from the operator's status conditions.
-- Installed as resource.customizations.health.saber.dev_SaberService in argocd-cm (see
-- argocd-cm-patch.yaml, which carries this exact text; a test keeps the two equal).
-- Ready=True is Healthy; Degraded=True is Degraded; a rollout in flight, or status not yet written
-- for the current generation, is Progressing. SLAMet is reported in the message but never makes the
-- app unhealthy: missing SLAs under load is a capacity matter, not a failed sync.
local hs = {}

local function find(conditions, kind)
  for _, c in ipairs(conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  local text = c.type .. "=" .. tostring(c.status)
  if c.reason ~= nil and c.reason ~= "" then
    text = text .. " (" .. c.reason .. ")"
  end
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

if obj.status == nil or obj.status.conditions == nil or #obj.status.conditions == 0 then
  hs.status = "Progressing"
  hs.message = "Waiting for the saber operator to report status"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the saber operator to observe generation " .. tostring(generation)
  return hs
end

local conditions = obj.status.conditions
local ready = find(conditions, "Ready")
local progressing = find(conditions, "Progressing")
local degraded = find(conditions, "Degraded")
local sla = find(conditions, "SLAMet")

if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end

if ready == nil or ready.status == "Unknown" then
  hs.status = "Progressing"
  hs.message = "Waiting for the Ready condition"
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  if sla ~= nil and sla.status == "False" then
    hs.message = hs.message .. "; " .. describe(sla)
  end
  return hs
end

if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(ready) .. "; " .. describe(progressing)
  return hs
end

hs.status = "Degraded"
hs.message = describe(ready)
return hs
