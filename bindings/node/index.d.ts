// Types of the devicelink addon (napi-rs; hand-written, kept in step with src/lib.rs).

export interface AgentConfig {
  /** Holds the device's identity and database (created if missing). */
  dataDir: string
  /** libp2p listen addresses; none: every interface on free ports (TCP and QUIC). */
  listen?: string[]
  /** Devices to dial directly. */
  peers?: string[]
  /** mDNS discovery on the LAN (default true). */
  mdns?: boolean
  /** Serve the local IPC socket for other apps and the CLI (default false). */
  ipc?: boolean
  ipcSocket?: string
  /** Serve the y-websocket endpoint for Yjs apps (default false). */
  ws?: boolean
  wsAddr?: string
  /** The name the other devices show (default: the host name). */
  name?: string
}

export interface PairedDevice { deviceId: string; name: string; verification: string }
export interface LinkedDevice { deviceId: string; name: string; connected: boolean }

export interface Activity {
  id: string
  activityType: string
  title: string
  docs: string[]
  appState: unknown
  origin: string
  holder: string
  epoch: number
  expiresAt: number
}

export interface ActivityDraft {
  activityType: string
  title: string
  docs: string[]
  appState?: unknown
  ttlSecs?: number
  id?: string
}

export interface HandoffResult { activity: Activity; docs: Record<string, unknown> }

export interface Conflict {
  id: string
  doc: string
  map: string
  key: string
  winnerValue: unknown
  winnerDevice: string
  loserValue: unknown
  loserDevice: string
  resolved?: string
}

/** Errors are `Error`s whose message starts with their kind: `WrongType: ...`, `Paused: ...`. */
export declare class Agent {
  static start(config: AgentConfig): Promise<Agent>
  deviceId(): string
  name(): string
  listenAddrs(): string[]
  wsUrl(): string | null
  isRunning(): boolean
  pause(): Promise<void>
  resume(): Promise<void>
  shutdown(): Promise<void>
  doc(name: string): Doc
  listDocs(): string[]
  pairOpen(expiresSecs: number): Promise<PairHost>
  pairJoin(code: string, peerAddr?: string | null): Promise<PairedDevice>
  devices(): LinkedDevice[]
  unpair(deviceId: string): Promise<boolean>
  publishActivity(draft: ActivityDraft): Promise<Activity>
  activities(): Activity[]
  unpublishActivity(id: string): Promise<void>
  handoff(id: string, timeoutSecs: number): Promise<HandoffResult>
  conflicts(doc?: string | null, includeResolved?: boolean): Conflict[]
  resolveConflict(id: string, keep: 'winner' | 'other' | 'local' | 'remote' | unknown): Promise<Conflict>
}

export declare class PairHost {
  code(): string
  wait(): Promise<PairedDevice>
}

export declare class Doc {
  name(): string
  set(map: string, key: string, value: unknown): Promise<void>
  get(map: string, key: string): unknown
  getJson(): Record<string, unknown>
  textAppend(name: string, text: string): Promise<void>
  text(name: string): string
  applyUpdate(update: Uint8Array): Promise<void>
  stateVector(): Buffer
  diff(stateVector: Uint8Array): Buffer
  /** Keeps the process alive until cancelled or the agent shuts down. */
  subscribe(callback: (update: Buffer, origin: string) => void): Subscription
}

export declare class Subscription {
  cancel(): void
}
