-- Test-only: makes a C-MOVE partial. The first copy of any instance whose SeriesDescription
-- is REJECT-ONCE is refused (C-STORE failure); the next copy is accepted. Lets the tests show
-- that a partial move is detected and the missing series re-fetched.
rejectedOnce = {}

function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.SeriesDescription == 'REJECT-ONCE' and rejectedOnce[dicom.SOPInstanceUID] == nil then
    rejectedOnce[dicom.SOPInstanceUID] = true
    return false
  end
  return true
end
