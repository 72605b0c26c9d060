/**
 * What the browser works out itself, said as trainorch_jupyter/jobview.py says it (the server sends the rest of
 * a job's texts in its `display`): ages, which move on the clock, and the status bar's total.
 */
import { JobSummary } from './api';

function finite(value: unknown): value is number {
  return typeof value === 'number' && Number.isFinite(value);
}

export function money(value: number | null | undefined): string {
  if (!finite(value)) {
    return '-';
  }
  return value >= 0.01 || value === 0 ? `$${value.toFixed(2)}` : `$${value.toFixed(4)}`;
}

export function duration(seconds: number | null | undefined): string {
  if (!finite(seconds)) {
    return '-';
  }
  const s = Math.max(0, Math.round(seconds));
  const pad = (n: number) => String(n).padStart(2, '0');
  if (s < 60) {
    return `${s}s`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ${pad(s % 60)}s`;
  }
  if (s < 86400) {
    return `${Math.floor(s / 3600)}h ${pad(Math.floor((s % 3600) / 60))}m`;
  }
  return `${Math.floor(s / 86400)}d ${pad(Math.floor((s % 86400) / 3600))}h`;
}

/** Seconds since an ISO time, or null. */
export function secondsSince(iso: string | null | undefined, now = Date.now()): number | null {
  const t = iso ? Date.parse(iso) : NaN;
  return Number.isFinite(t) ? Math.max(0, (now - t) / 1000) : null;
}

/** The fraction done, 0..1, or null when the job does not know its total. */
export function fraction(job: JobSummary): number | null {
  if (finite(job.progress)) {
    return Math.min(1, Math.max(0, job.progress));
  }
  return job.state === 'COMPLETED' ? 1 : null;
}

/** The status bar's words: "2 running · $1.23" (jobview.status_text). */
export function statusText(running: number, cost: number): string {
  return `${running} running \u00b7 ${money(cost)}`;
}
