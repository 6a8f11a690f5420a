// ComfyUI-LiveAvatar frontend extension.
// The core audio upload button ("upload", added by Comfy.UploadAudio to any COMBO named "audio"
// with audio_upload) needs an "audioUI" player widget, which the core only adds to its own audio
// nodes by name. Give LiveAvatarLoadAudio16k the same player, placed before the upload button.
import { app } from "../../scripts/app.js";

app.registerExtension({
  name: "LiveAvatar.LoadAudio16kPlayer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "LiveAvatarLoadAudio16k") return;
    const required = nodeData.input.required;
    const upload = required.upload;
    delete required.upload;
    required.audioUI = ["AUDIO_UI", {}];
    if (upload) required.upload = upload;
  },
});
