/**
 * The server extension's REST API (/api/training, see docs/ and .helper's contract) through
 * ServerConnection, which sends the token and the XSRF header; nothing secret goes in a URL.
 */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface JobSummary {
  id: string;
  name: string | null;
  provider: string;
  state: string;
  live: boolean;
  progress: number | null;
  step: number | null;
  total_steps: number | null;
  last_loss: number | null;
  cost_usd: number | null;
  price_per_hour: number | null;
  created_at: string | null;
  updated_at: string | null;
  started_at: string | null;
  ended_at: string | null;
  error: string | null;
  artifacts_dir: string | null;
  gpu: string | null;
  /** Created through the API and not submitted yet. */
  draft?: boolean;
  /** The texts the notebook panel shows (trainorch_jupyter/jobview.py), so both say the same. */
  display: {
    state_label: string;
    state_color: string;
    progress_text: string;
    loss_text: string;
    cost_text: string;
  };
}

export interface LogChunk {
  bytes: Uint8Array;
  next: number;
  complete: boolean;
}

export class TrainingAPI {
  constructor(readonly settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {}

  url(path: string, query: Record<string, string | number> = {}): string {
    const base = URLExt.join(this.settings.baseUrl, 'api/training', path);
    const q = Object.entries(query).map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`);
    return q.length ? `${base}?${q.join('&')}` : base;
  }

  /** A request that throws ResponseError, with the server's own message, unless the answer is 2xx. */
  async request(url: string, init: RequestInit = {}): Promise<Response> {
    const resp = await ServerConnection.makeRequest(url, init, this.settings);
    if (!resp.ok) {
      let message = `${resp.status} ${resp.statusText}`;
      try {
        const body = await resp.json();
        message = body.error ?? body.message ?? message;
      } catch {
        // not JSON: keep the status line
      }
      throw new ServerConnection.ResponseError(resp, message);
    }
    return resp;
  }

  async listJobs(since?: string): Promise<{ jobs: JobSummary[]; now: string }> {
    const resp = await this.request(this.url('jobs', since ? { since } : {}));
    return resp.json();
  }

  async cancel(id: string): Promise<JobSummary> {
    const resp = await this.request(this.url(`jobs/${encodeURIComponent(id)}/cancel`), { method: 'POST' });
    return resp.json();
  }

  async log(id: string, offset: number, limit: number): Promise<LogChunk> {
    const resp = await this.request(this.url(`jobs/${encodeURIComponent(id)}/logs`, { offset, limit }));
    const bytes = new Uint8Array(await resp.arrayBuffer());
    const next = Number(resp.headers.get('X-Next-Offset'));
    return {
      bytes,
      next: Number.isFinite(next) ? next : offset + bytes.length,
      complete: resp.headers.get('X-Log-Complete') === '1'
    };
  }

  /** Open the event stream of job changes (no log lines: `logs=`); read it with readEvents, abort it by `signal`. */
  events(signal: AbortSignal): Promise<Response> {
    return this.request(this.url('events', { logs: '' }), { signal, headers: { Accept: 'text/event-stream' } });
  }
}

/**
 * Read a text/event-stream body until it ends, calling onEvent(type, data) for each event; `onBytes` is
 * called on anything read, pings included (for a liveness watchdog).
 */
export async function readEvents(
  resp: Response,
  onEvent: (type: string, data: string) => void,
  onBytes: () => void
): Promise<void> {
  if (!resp.body) {
    throw new Error('the event stream has no body');
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      return;
    }
    onBytes();
    buf += decoder.decode(value, { stream: true }).replace(/\r/g, '');
    let end: number;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      let type = 'message';
      const data: string[] = [];
      for (const line of block.split('\n')) {
        if (!line || line.startsWith(':')) {
          continue;
        }
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
        if (field === 'event') {
          type = text;
        } else if (field === 'data') {
          data.push(text);
        }
      }
      if (data.length) {
        onEvent(type, data.join('\n'));
      }
    }
  }
}
