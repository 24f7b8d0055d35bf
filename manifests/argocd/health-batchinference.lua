-- Argo CD health check for batchinfer.dev/BatchInference.
-- Healthy on Succeeded, Degraded on Failed (or a refused spec change), Progressing otherwise.
local hs = {}
local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the batchinfer operator"
  return hs
end

if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "SpecRejected" and condition.status == "True" then
      hs.status = "Degraded"
      hs.message = "Spec change refused: " .. (condition.message or "")
      return hs
    end
  end
end

local progress = ""
if status.progress ~= nil and status.progress.display ~= nil then
  progress = " " .. status.progress.display
end

if status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded" .. progress
elseif status.phase == "Failed" then
  hs.status = "Degraded"
  local reason = status.reason or "Failed"
  hs.message = reason .. ": " .. (status.message or "no message")
else
  hs.status = "Progressing"
  hs.message = status.phase .. progress
end
return hs
