-- Orthanc auto-routing to the grading node: route each MR series when it is
-- stable. OnStableSeries, not OnStableStudy: the node's report goes back into
-- the same study, which would make the study "unstable" again and loop.
-- Requires a DicomModalities entry named "gliomanode" in orthanc.json, e.g.
--   "DicomModalities": { "gliomanode": ["GLIOMANODE", "10.0.0.20", 11112] }
function OnStableSeries(seriesId, tags, metadata)
  if tags["Modality"] == "MR" then
    SendToModality(seriesId, "gliomanode")
  end
end
