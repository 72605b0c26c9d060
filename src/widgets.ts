/**
 * The views: the sidebar's job list, one job's live log in the main area, the status bar item.
 * Plain DOM, updated in place (a row keeps its buttons while the job changes under it).
 */
import type { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { JobSummary } from './api';
import { JobsModel } from './model';
import { duration, fraction, money, secondsSince, statusText } from './format';

export interface IJobActions {
  /** Ask, then cancel through the server; resolves true when the server took the cancel. */
  cancel(job: JobSummary): Promise<boolean>;
  openLog(job: JobSummary): void;
  revealArtifacts(job: JobSummary): void;
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, cls: string, text = ''): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  node.className = cls;
  node.textContent = text;
  return node;
}

function button(label: string, title: string, onClick: () => void): HTMLButtonElement {
  const b = el('button', 'jp-TrainorchJobs-button', label);
  b.type = 'button';
  b.title = title;
  b.addEventListener('click', onClick);
  return b;
}

export function jobLabel(job: JobSummary): string {
  return job.name ? `${job.name} (${job.id})` : job.id;
}

/** The left sidebar: every job of the workspace. */
export class JobsSidebar extends Widget {
  constructor(
    private readonly _model: JobsModel,
    private readonly _actions: IJobActions
  ) {
    super();
    this.id = 'trainorch-jobs';
    this.addClass('jp-TrainorchJobs');
    this.title.caption = 'Training jobs';
    const head = el('div', 'jp-TrainorchJobs-header');
    head.append(el('h2', 'jp-TrainorchJobs-title', 'Training jobs'), this._summary, this._mode);
    this._empty.textContent = 'No training jobs in this workspace yet. Submit one from a notebook with %train submit.';
    this.node.append(head, this._empty, this._list);
    _model.changed.connect(this._schedule, this);
  }

  dispose(): void {
    clearInterval(this._tick);
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    this._model.sidebarVisible = true;
    this._render();
    this._tick = setInterval(() => this._render(), 5000); // ages and costs move
  }

  protected onAfterHide(msg: Message): void {
    this._model.sidebarVisible = false;
    clearInterval(this._tick);
  }

  private _schedule(): void {
    if (this.isVisible && !this._pending) {
      this._pending = requestAnimationFrame(() => {
        this._pending = 0;
        this._render();
      });
    }
  }

  private _render(): void {
    const jobs = this._model.jobs;
    const now = Date.now();
    let before: ChildNode | null = this._list.firstChild;
    const seen = new Set<string>();
    for (const job of jobs) {
      seen.add(job.id);
      let row = this._rows.get(job.id);
      if (!row) {
        row = new JobRow(this._actions);
        this._rows.set(job.id, row);
      }
      row.update(job, now);
      if (row.node !== before) {
        this._list.insertBefore(row.node, before);
      }
      before = row.node.nextSibling;
    }
    for (const [id, row] of this._rows) {
      if (!seen.has(id)) {
        row.node.remove();
        this._rows.delete(id);
      }
    }
    const live = this._model.live.length;
    this._empty.hidden = jobs.length > 0;
    this._summary.textContent = jobs.length ? `${live} live \u00b7 ${jobs.length} in all` : '';
    const mode = this._model.mode;
    this._mode.dataset.mode = mode;
    this._mode.textContent = { stream: '\u25cf live', polling: '\u25cb polling', idle: '' }[mode];
    this._mode.title = {
      stream: 'Updated live by the server\u2019s event stream',
      polling: 'The event stream is not available: polling the server',
      idle: ''
    }[mode];
  }

  private _summary = el('span', 'jp-TrainorchJobs-summary');
  private _mode = el('span', 'jp-TrainorchJobs-mode');
  private _empty = el('div', 'jp-TrainorchJobs-empty');
  private _list = el('div', 'jp-TrainorchJobs-list');
  private _rows = new Map<string, JobRow>();
  private _pending = 0;
  private _tick: ReturnType<typeof setInterval> | undefined = undefined;
}

/** One job in the sidebar. */
class JobRow {
  readonly node = el('div', 'jp-TrainorchJobs-job');

  constructor(private readonly _actions: IJobActions) {
    const head = el('div', 'jp-TrainorchJobs-jobHead');
    head.append(this._name, this._badge);
    const bar = el('div', 'jp-TrainorchJobs-bar');
    bar.append(this._fill);
    this._progress.append(bar, this._progressText);
    const actions = el('div', 'jp-TrainorchJobs-actions');
    actions.append(this._logBtn, this._artifactsBtn, this._cancelBtn);
    this.node.append(head, this._progress, this._facts, this._error, actions);
  }

  update(job: JobSummary, now: number): void {
    this._job = job;
    this.node.dataset.jobId = job.id;
    this.node.dataset.state = job.state;
    this._name.textContent = job.name || job.id;
    this._name.title = job.id;
    const shown = job.display; // the server's texts: the panel's
    const color = shown.state_color;
    this._badge.textContent = shown.state_label;
    this._badge.dataset.state = job.state;
    this._badge.style.background = color;
    const frac = fraction(job);
    const pct = frac === null ? 0 : frac * 100;
    this._progress.dataset.progress = pct.toFixed(1);
    this._progress.dataset.step = String(job.step ?? '');
    this._fill.style.width = `${pct.toFixed(1)}%`;
    this._fill.style.background = color;
    const loss = shown.loss_text !== '-' ? `loss ${shown.loss_text}` : '';
    this._progressText.textContent = [shown.progress_text, loss].filter(t => t).join(' \u00b7 ');
    const facts = [
      job.draft ? 'draft' : '',
      job.provider,
      job.gpu ?? '',
      shown.cost_text,
      `${duration(secondsSince(job.created_at, now))} ago`
    ];
    this._facts.textContent = facts.filter(f => f).join(' \u00b7 ');
    this._facts.dataset.cost = String(job.cost_usd ?? '');
    this._facts.title = `price ${money(job.price_per_hour)}/h \u00b7 created ${job.created_at ?? '-'}`;
    this._error.textContent = job.error ?? '';
    this._error.hidden = !job.error;
    this._artifactsBtn.disabled = !job.artifacts_dir;
    this._cancelBtn.hidden = !job.live;
    const asked = this._cancelAsked && job.live;
    this._cancelBtn.disabled = asked;
    this._cancelBtn.textContent = asked ? 'Cancelling\u2026' : 'Cancel';
  }

  private async _cancel(): Promise<void> {
    this._cancelBtn.disabled = true;
    this._cancelAsked = await this._actions.cancel(this._job);
    this.update(this._job, Date.now());
  }

  private _job!: JobSummary;
  private _cancelAsked = false;
  private _name = el('span', 'jp-TrainorchJobs-name');
  private _badge = el('span', 'jp-TrainorchJobs-badge');
  private _progress = el('div', 'jp-TrainorchJobs-progress');
  private _fill = el('div', 'jp-TrainorchJobs-fill');
  private _progressText = el('span', 'jp-TrainorchJobs-progressText');
  private _facts = el('div', 'jp-TrainorchJobs-facts');
  private _error = el('div', 'jp-TrainorchJobs-error');
  private _logBtn = button('Log', 'Open the live log in the main area', () => this._actions.openLog(this._job));
  private _artifactsBtn = button('Artifacts', 'Show the artifacts folder in the file browser', () =>
    this._actions.revealArtifacts(this._job)
  );
  private _cancelBtn = button('Cancel', 'Cancel this job (asks first)', () => void this._cancel());
}

const LOG_CHUNK = 256 * 1024;
const LOG_KEEP = 1_000_000; // characters shown; the whole log stays on disk

/** One job's log, followed by byte offset (GET .../logs?offset=) until the server says it is complete. */
export class LogView extends Widget {
  constructor(
    private readonly _model: JobsModel,
    readonly jobId: string
  ) {
    super();
    this.addClass('jp-TrainorchLog');
    this.node.append(this._pre, this._status);
    _model.changed.connect(() => !this._model.get(jobId)?.live && this._kick(0), this); // its end: read to it
    this._kick(0);
  }

  get complete(): boolean {
    return this._complete;
  }

  dispose(): void {
    clearTimeout(this._timer);
    this._timer = undefined;
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    this._kick(0);
  }

  /** Fetch in `delay` ms: sooner replaces later; asked during a fetch, fetch again right after it. */
  private _kick(delay: number): void {
    if (this.isDisposed || this._complete) {
      return;
    }
    if (this._busy) {
      this._again = this._again || delay === 0;
      return;
    }
    if (this._timer !== undefined) {
      if (delay > 0 || this._due <= Date.now()) {
        return;
      }
      clearTimeout(this._timer);
    }
    this._due = Date.now() + delay;
    this._timer = setTimeout(() => {
      this._timer = undefined;
      void this._fetch();
    }, delay);
  }

  private async _fetch(): Promise<void> {
    this._busy = true;
    try {
      for (;;) {
        const chunk = await this._model.api.log(this.jobId, this._offset, LOG_CHUNK);
        this._append(this._decoder.decode(chunk.bytes, { stream: !chunk.complete }));
        const moved = chunk.next > this._offset;
        this._offset = Math.max(this._offset, chunk.next);
        this._complete = chunk.complete;
        if (chunk.complete || !moved || chunk.bytes.length < LOG_CHUNK) {
          break;
        }
      }
      this._errors = 0;
      this._status.textContent = this._complete ? 'End of log.' : 'Following\u2026';
    } catch (e) {
      this._errors += 1;
      this._status.textContent = `Could not read the log: ${(e as Error).message}`;
    } finally {
      this._busy = false;
    }
    this.node.dataset.complete = String(this._complete);
    // Follow: every second while shown, slower behind another tab, backing off on errors.
    const base = this.isVisible ? 1000 : 10_000;
    this._kick(this._again ? 0 : Math.min(base * 2 ** this._errors, 60_000));
    this._again = false;
  }

  private _append(text: string): void {
    if (!text) {
      return;
    }
    const node = this.node;
    const atEnd = node.scrollHeight - node.scrollTop - node.clientHeight < 40;
    this._chars += text.length;
    if (this._chars > LOG_KEEP) {
      const all = (this._pre.textContent ?? '') + text;
      const keep = all.slice(all.indexOf('\n', all.length - Math.floor(LOG_KEEP * 0.8)) + 1);
      this._pre.textContent = `[earlier lines not shown: the whole log is .trainorch/logs/${this.jobId}.log]\n${keep}`;
      this._chars = this._pre.textContent.length;
    } else {
      this._pre.append(document.createTextNode(text));
    }
    if (atEnd) {
      node.scrollTop = node.scrollHeight;
    }
  }

  private _pre = el('pre', 'jp-TrainorchLog-text');
  private _status = el('div', 'jp-TrainorchLog-status', 'Loading\u2026');
  private _decoder = new TextDecoder();
  private _offset = 0;
  private _chars = 0;
  private _complete = false;
  private _busy = false;
  private _again = false;
  private _due = 0;
  private _errors = 0;
  private _timer: ReturnType<typeof setTimeout> | undefined = undefined;
}

/** "2 running · $1.23" in the status bar; a click shows the sidebar. */
export class StatusItem extends Widget {
  constructor(
    private readonly _model: JobsModel,
    onClick: () => void
  ) {
    super();
    this.addClass('jp-TrainorchStatus');
    this.node.title = 'Training jobs: live now, and what they have cost so far. Click to show them.';
    this.node.addEventListener('click', onClick);
    _model.changed.connect(this._render, this);
    this._render();
  }

  private _render(): void {
    const { running, cost } = this._model.totals;
    this.node.dataset.running = String(running);
    this.node.textContent = statusText(running, cost);
  }
}
