// A live-update bundle needs to tell the updater it started fine, or the plugin rolls back.
import { CapacitorUpdater } from "@capgo/capacitor-updater";
CapacitorUpdater.notifyAppReady();
