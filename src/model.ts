/**
 * Every job of the workspace, kept up to date for the sidebar, the status bar and the notifications.
 *
 * Live updates come by the server's event stream (GET /api/training/events: pushed, so the browser is idle
 * between events, and the server does not count it as activity unless a job is live). While the stream is
 * down, GET /api/training/jobs?since= is polled instead, backing off on errors: every 2 s while the sidebar
 * shows a live job, 10 s while it is hidden and a job is live (the status bar and the notifications), 30 s
 * while the sidebar shows no live job, and not at all while it is hidden with no live job. Nothing runs while
 * the browser tab is hidden; coming back resynchronises.
 */
import { ISignal, Signal } from '@lumino/signaling';

import { JobSummary, TrainingAPI, readEvents } from './api';

export type Mode = 'stream' | 'polling' | 'idle';

const RUNNING = new Set(['PROVISIONING', 'RUNNING', 'DOWNLOADING']);

const STREAM_RETRY_MAX_MS = 30_000;
const POLL_MAX_MS = 60_000;
const WATCHDOG_MS = 45_000; // the server pings every 15 s
const STREAM_STEADY_MS = 10_000; // a stream that lived this long resets the retry backoff

export class JobsModel {
  constructor(readonly api: TrainingAPI) {}

  /** Any change: a job's state, progress, cost, or the connection mode. */
  get changed(): ISignal<this, void> {
    return this._changed;
  }
  /** A job went from live to finished while this page watched (COMPLETED, FAILED or CANCELLED). */
  get ended(): ISignal<this, JobSummary> {
    return this._ended;
  }
  get mode(): Mode {
    return this._mode;
  }

  /** Live jobs first, then the newest. */
  get jobs(): JobSummary[] {
    const created = (j: JobSummary) => Date.parse(j.created_at ?? '') || 0;
    return [...this._jobs.values()].sort((a, b) => Number(b.live) - Number(a.live) || created(b) - created(a));
  }

  /** Submitted jobs that have not ended (a draft is not live: nothing drives it yet). */
  get live(): JobSummary[] {
    return [...this._jobs.values()].filter(j => j.live && !j.draft);
  }

  /** What the status bar says, counted as the server's /summary counts: jobs on a machine, and the cost of the live. */
  get totals(): { running: number; cost: number } {
    const live = this.live;
    return {
      running: live.filter(j => RUNNING.has(j.state)).length,
      cost: live.reduce((sum, j) => sum + (j.cost_usd ?? 0), 0)
    };
  }

  get(id: string): JobSummary | undefined {
    return this._jobs.get(id);
  }

  set sidebarVisible(visible: boolean) {
    if (visible === this._sidebarVisible) {
      return;
    }
    this._sidebarVisible = visible;
    this._clearPoll(); // its interval depends on this
    if (visible && this._mode !== 'stream') {
      void this.refresh().catch(() => undefined);
    }
    this._update();
  }

  start(): void {
    document.addEventListener('visibilitychange', this._onVisibility);
    void this.refresh().catch(() => undefined);
    this._update();
  }

  dispose(): void {
    this._disposed = true;
    document.removeEventListener('visibilitychange', this._onVisibility);
    this._stopStream();
    this._clearPoll();
    this._clearRetry();
    Signal.clearData(this);
  }

  /** Fetch what changed since the last answer (everything the first time). */
  refresh(): Promise<void> {
    if (!this._refreshing) {
      this._refreshing = this.api
        .listJobs(this._since ?? undefined)
        .then(({ jobs, now }) => {
          this._merge(jobs);
          this._since = now;
          this._loadedAt = this._loadedAt ?? now;
        })
        .finally(() => {
          this._refreshing = null;
        });
    }
    return this._refreshing;
  }

  async cancel(id: string): Promise<JobSummary> {
    const job = await this.api.cancel(id);
    this._merge([job]);
    return job;
  }

  private _merge(list: JobSummary[]): void {
    if (!list.length) {
      return;
    }
    const ended: JobSummary[] = [];
    for (const job of list) {
      const prev = this._jobs.get(job.id);
      if (prev && Date.parse(job.updated_at ?? '') < Date.parse(prev.updated_at ?? '')) {
        continue; // an older view than the one we hold
      }
      this._jobs.set(job.id, job);
      const wasLive = prev ? prev.live : this._endedSinceLoad(job);
      if (wasLive && !job.live) {
        ended.push(job);
      }
    }
    this._changed.emit();
    ended.forEach(job => this._ended.emit(job));
    this._update(); // a job going live or ending changes the polling interval
  }

  /** A job first seen finished, but which ended after this page first loaded the list, ended while watched. */
  private _endedSinceLoad(job: JobSummary): boolean {
    return this._loadedAt !== null && Date.parse(job.ended_at ?? '') > Date.parse(this._loadedAt);
  }

  private _update(): void {
    if (this._disposed) {
      return;
    }
    if (document.hidden) {
      this._stopStream();
      this._clearPoll();
      this._clearRetry();
      this._setMode('idle');
      return;
    }
    if (!this._abort && this._retry === null) {
      void this._connect();
    }
    if (this._mode !== 'stream') {
      this._schedulePoll();
    }
  }

  private async _connect(): Promise<void> {
    const abort = new AbortController();
    this._abort = abort;
    let openedAt: number | null = null;
    try {
      const resp = await this.api.events(abort.signal);
      openedAt = Date.now();
      this._clearPoll();
      this._setMode('stream');
      this._armWatchdog();
      void this.refresh().catch(() => undefined); // what changed while the stream was down
      await readEvents(
        resp,
        (type, data) => this._onEvent(type, data),
        () => this._armWatchdog()
      );
    } catch {
      // refused, dropped, or aborted: said below
    } finally {
      clearTimeout(this._watchdog);
    }
    if (this._abort !== abort) {
      return; // stopped on purpose (tab hidden, disposed)
    }
    this._abort = null;
    const steady = openedAt !== null && Date.now() - openedAt > STREAM_STEADY_MS;
    this._streamFailures = steady ? 0 : this._streamFailures + 1;
    const delay = Math.min(1000 * 2 ** this._streamFailures, STREAM_RETRY_MAX_MS);
    this._retry = setTimeout(() => {
      this._retry = null;
      this._update();
    }, delay);
    this._setMode('idle');
    this._update(); // polls meanwhile
  }

  private _onEvent(type: string, data: string): void {
    let value: unknown;
    try {
      value = JSON.parse(data);
    } catch {
      return;
    }
    if (type === 'job') {
      this._merge([value as JobSummary]);
    }
  }

  private _armWatchdog(): void {
    clearTimeout(this._watchdog);
    this._watchdog = setTimeout(() => this._abort?.abort(), WATCHDOG_MS);
  }

  private _schedulePoll(): void {
    if (this._poll !== null) {
      return;
    }
    const live = this.live.length > 0;
    const base = this._sidebarVisible ? (live ? 2000 : 30_000) : live ? 10_000 : null;
    if (base === null) {
      this._setMode('idle');
      return;
    }
    this._setMode('polling');
    const delay = Math.min(base * 2 ** this._pollFailures, POLL_MAX_MS);
    this._poll = setTimeout(async () => {
      try {
        await this.refresh();
        this._pollFailures = 0;
      } catch {
        this._pollFailures += 1;
      }
      this._poll = null;
      this._update();
    }, delay);
  }

  private _stopStream(): void {
    const abort = this._abort;
    this._abort = null;
    abort?.abort();
  }

  private _clearPoll(): void {
    if (this._poll !== null) {
      clearTimeout(this._poll);
      this._poll = null;
    }
  }

  private _clearRetry(): void {
    if (this._retry !== null) {
      clearTimeout(this._retry);
      this._retry = null;
    }
  }

  private _setMode(mode: Mode): void {
    if (mode !== this._mode) {
      this._mode = mode;
      this._changed.emit();
    }
  }

  private _onVisibility = (): void => {
    if (!document.hidden) {
      void this.refresh().catch(() => undefined);
    }
    this._update();
  };

  private _jobs = new Map<string, JobSummary>();
  private _since: string | null = null;
  private _loadedAt: string | null = null;
  private _refreshing: Promise<void> | null = null;
  private _sidebarVisible = false;
  private _mode: Mode = 'idle';
  private _abort: AbortController | null = null;
  private _retry: ReturnType<typeof setTimeout> | null = null;
  private _poll: ReturnType<typeof setTimeout> | null = null;
  private _watchdog: ReturnType<typeof setTimeout> | undefined = undefined;
  private _streamFailures = 0;
  private _pollFailures = 0;
  private _disposed = false;
  private _changed = new Signal<this, void>(this);
  private _ended = new Signal<this, JobSummary>(this);
}
