// WebRTC is off in cowherd: datacenter swarms use TCP and uTP peers only. simple-peer imports these
// names; undefined makes WebRTC unavailable instead of crashing the import.
export const RTCPeerConnection = undefined;
export const RTCSessionDescription = undefined;
export const RTCIceCandidate = undefined;
export default {};
