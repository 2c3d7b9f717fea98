-- Test-only filters on the research server, keyed on SeriesDescription:
--   REJECT-ONCE:   the first copy of each instance is refused (C-STORE failure), the next is
--                  accepted. Makes a C-MOVE partial; a series re-fetch completes it.
--   REJECT-ALWAYS: every copy is refused. The study can never be completed.
rejectedOnce = {}

function ReceivedInstanceFilter(dicom, origin, info)
  local description = dicom.SeriesDescription
  if description == 'REJECT-ALWAYS' then
    return false
  end
  if description == 'REJECT-ONCE' and rejectedOnce[dicom.SOPInstanceUID] == nil then
    rejectedOnce[dicom.SOPInstanceUID] = true
    return false
  end
  return true
end
